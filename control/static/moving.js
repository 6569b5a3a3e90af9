// The page shown when a saved setting moves the portal (SSL on or off, another web port): wait until
// this address stops answering as before, which is when the web server has switched, then go to
// the new one. Until the switch the old address answers normally; after it, the TLS port answers
// plain http with a redirect (SSL on), or no longer speaks https or listens at all (SSL off, port moved).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const moving = document.getElementById("moving");
  if (!moving) return;
  const target = moving.dataset.target;
  const check = async () => {
    try {
      const answer = await fetch("/healthz", { redirect: "manual", cache: "no-store" });
      if (answer.type !== "opaqueredirect") {
        setTimeout(check, 300);
        return;
      }
    } catch {
      // Nothing answers here as before: the web server has switched.
    }
    window.location.replace(target);
  };
  setTimeout(check, 300);
});
