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
  const source = new EventSource(listing.dataset.watch);
  source.addEventListener("ready", async () => {
    opened += 1;
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
  source.addEventListener("failed", (event) => {
    const doc = JSON.parse(event.data);
    source.close();
    if (doc.status === 401) return signIn();
    if (status) status.textContent = doc.error;
  });
  source.onerror = async () => {
    listing.dataset.live = "0";
    if (source.readyState !== EventSource.CLOSED) {
      if (status) status.textContent = "Live updates interrupted; reconnecting ...";
      return;
    }
    // Refused, and the browser does not retry: signed out (401), or too many live alert
    // pages open (429).
    const response = await fetch(rows.dataset.refresh || "/live/alerts", {
      credentials: "same-origin",
    }).catch(() => null);
    if (response && response.status === 401) return signIn();
    if (status) {
      status.textContent =
        "Live updates off: too many live alert pages are open in this browser or for " +
        "this operator; close some and reload this page.";
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach((box) => {
    if (box.tagName !== "TBODY") refresh(box);
  });
  document.querySelectorAll("table[data-watch]").forEach(watch);
});
