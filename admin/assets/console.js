// The operator console's only script (served from /console/assets, so the
// page's CSP allows it; nothing inline). Without it every form still works;
// it adds the confirmations, the live migration progress and the
// impersonation banner preview.
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

// Live progress: refetches the fragment every second while a run is under way.
function follow(box) {
  const url = box.getAttribute("data-live");
  const tick = async () => {
    try {
      const res = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (res.ok) {
        box.innerHTML = await res.text();
      }
    } catch (_) {
      // The next tick tries again.
    }
    if (box.querySelector("[data-running]")) {
      setTimeout(tick, 1000);
    } else {
      const run = document.querySelector("form[action='/console/migrations/run'] button");
      if (run) run.disabled = false;
    }
  };
  if (box.querySelector("[data-running]")) setTimeout(tick, 1000);
}

// The banner a web app would show, read from GET /v1/me with the
// impersonation session.
async function banner(section) {
  const token = section.getAttribute("data-token");
  const put = (id, text) => {
    const el = document.getElementById(id);
    if (el) el.textContent = text;
  };
  try {
    const res = await fetch("/v1/me", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    const me = await res.json();
    put("banner-header", res.headers.get("plinth-impersonation") || "(absent)");
    put("banner-user", me.user ? me.user.email : "(unknown)");
    const imp = me.impersonation || {};
    put("banner-operator", imp.operator_email || "(none)");
    put("banner-reason", imp.reason || "(none)");
    put("banner-expires", imp.expires_at || "(none)");
    section.setAttribute("data-loaded", "true");
  } catch (err) {
    put("banner-header", "could not ask /v1/me: " + err);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(follow);
  document.querySelectorAll("#banner[data-token]").forEach(banner);
});
