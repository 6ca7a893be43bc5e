"""The fleet console: a small web front end on the operator API, served by the control plane.

Every page and action calls the operator API (gRPC) with the signed-in operator's own token,
so what a person may see and do in the browser is exactly what the API lets that token do.
Pages are rendered on the server; a little JavaScript refreshes live parts (rollouts by
polling, alerts from the watch stream as server-sent events); charts are inline SVG.
"""
