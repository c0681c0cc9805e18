// failback console: refreshes the live region by short polling (same URL + partial=1),
// keeps checked boxes across refreshes, shows a banner when the service is unreachable,
// sends an ended session to the login page, copies a new token. No inline code anywhere
// (the Content-Security-Policy forbids it).
"use strict";
(function () {
  const POLL_MS = 2000;
  const banner = () => document.getElementById("conn-lost");

  function lost(yes) {
    const b = banner();
    if (b) b.hidden = !yes;
    document.body.classList.toggle("offline", yes);
  }

  async function refresh() {
    const live = document.getElementById("live");
    if (!live || document.hidden) return;
    const u = new URL(location.href);
    u.searchParams.set("partial", "1");
    let r;
    try {
      r = await fetch(u, { credentials: "same-origin", headers: { "X-Console-Poll": "1" }, cache: "no-store" });
    } catch (e) {
      lost(true);
      return;
    }
    if (r.status === 401) {
      location.assign("/console/login?expired=1");
      return;
    }
    if (!r.ok) {
      lost(true);
      return;
    }
    const html = await r.text();
    const checked = new Set(
      Array.from(live.querySelectorAll("input[type=checkbox]:checked")).map((c) => c.value)
    );
    live.innerHTML = html; // server-rendered, every value escaped; scripts never run here
    live.querySelectorAll("input[type=checkbox]").forEach((c) => {
      if (checked.has(c.value)) c.checked = true;
    });
    lost(false);
    document.body.dataset.refreshed = String(Date.now());
  }

  function copy(ev) {
    const id = ev.target.getAttribute("data-copy");
    const el = id && document.getElementById(id);
    if (!el) return;
    el.select();
    const done = () => { ev.target.textContent = "Copied"; };
    if (navigator.clipboard) navigator.clipboard.writeText(el.value).then(done, () => document.execCommand("copy") && done());
    else if (document.execCommand("copy")) done();
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("[data-copy]").forEach((b) => b.addEventListener("click", copy));
    if (document.getElementById("live")) setInterval(refresh, POLL_MS);
  });
})();
