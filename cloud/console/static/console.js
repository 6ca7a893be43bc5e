// The console's only script: refreshes live parts of a page. Everything it inserts was
// rendered (and escaped) by the server; it builds no HTML from data itself.
"use strict";

function signIn() {
  window.location.assign("/login?expired=1&next=" + encodeURIComponent(location.pathname));
}

// <div data-refresh="/live/..." data-interval="1000">: replaced from the server until the
// fragment carries data-final-marker="1" (a finished rollout changes no more). The version
// held (ETag) goes with each request: the server answers 304 when nothing changed, and the
// page then asks less often (up to 8 times the interval) until something does.
function refresh(box) {
  const every = Number(box.dataset.interval || 2000);
  let stopped = false;
  let delay = every;
  let version = box.dataset.version || "";
  async function tick() {
    if (stopped) return;
    try {
      const headers = version ? { "If-None-Match": version } : {};
      const response = await fetch(box.dataset.refresh, {
        credentials: "same-origin",
        cache: "no-store",
        headers,
      });
      if (response.status === 401) return signIn();
      if (response.status === 304) {
        delay = Math.min(delay * 2, 8 * every);
      } else if (response.ok) {
        box.innerHTML = await response.text();
        box.dataset.updated = String(Date.now());
        version = response.headers.get("ETag") || "";
        delay = every;
        const marker = box.querySelector("[data-final-marker]");
        if (marker && marker.dataset.finalMarker === "1") stopped = true;
      }
    } catch (err) {
      // the control plane restarting: try again at the next tick
    }
    if (!stopped) setTimeout(tick, delay);
  }
  const marker = box.querySelector("[data-final-marker]");
  if (!marker || marker.dataset.finalMarker !== "1") setTimeout(tick, every);
}

// <table data-watch="/live/alerts/watch">: the alert watch stream; each event carries the
// alert's row as the server renders it, put in place of the row shown or on top.
function watch(listing) {
  const rows = listing.querySelector("tbody");
  const status = document.getElementById("watch-status");
  let opened = 0;
  let backoff = 1000; // the wait before opening a stream the browser gave up on, doubling
  const connect = () => {
    const source = new EventSource(listing.dataset.watch);
    source.addEventListener("ready", async () => {
      opened += 1;
      backoff = 1000;
      if (status) status.textContent = "Live: changes appear as they happen.";
      listing.dataset.live = "1";
      if (opened > 1 && rows.dataset.refresh) {
        // Reconnected: what changed meanwhile comes from the list.
        const response = await fetch(rows.dataset.refresh, { credentials: "same-origin" });
        if (response.ok) rows.innerHTML = await response.text();
      }
    });
    source.addEventListener("alert", (event) => {
      const doc = JSON.parse(event.data);
      const holder = document.createElement("tbody");
      holder.innerHTML = doc.row;
      const row = holder.firstElementChild;
      if (!row) return;
      const shown = Array.from(rows.children).find((r) => r.dataset.alertId === doc.id);
      if (shown) shown.replaceWith(row);
      else rows.prepend(row);
      row.classList.add("changed");
    });
    // The server's own word, e.g. too many live alert pages open (429): no retry.
    source.addEventListener("failed", (event) => {
      const doc = JSON.parse(event.data);
      source.close();
      listing.dataset.live = "0";
      if (doc.status === 401) return signIn();
      if (status) status.textContent = doc.error;
    });
    source.onerror = async () => {
      listing.dataset.live = "0";
      if (source.readyState !== EventSource.CLOSED) {
        if (status) status.textContent = "Live updates interrupted; reconnecting ...";
        return;
      }
      // The browser gave up (signed out, or e.g. a proxy's 502 while the console restarts):
      // sign in again, or open the stream again later.
      const response = await fetch(rows.dataset.refresh || "/live/alerts", {
        credentials: "same-origin",
      }).catch(() => null);
      if (response && response.status === 401) return signIn();
      const seconds = Math.round(backoff / 1000);
      if (status) status.textContent = `Live updates interrupted; retrying in ${seconds} s ...`;
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 60000);
    };
  };
  connect();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach((box) => {
    if (box.tagName !== "TBODY") refresh(box);
  });
  document.querySelectorAll("table[data-watch]").forEach(watch);
});
