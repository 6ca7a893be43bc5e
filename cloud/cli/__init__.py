"""The operator CLI (`autoglm`): a client of the control plane's API, never of its database."""
