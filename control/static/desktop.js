// "Desktop viewer": ask the portal for a short-lived access to what the row holds, then start Weasis
// with the weasis:// link it answers (control/desktop). In a file of its own: the content security
// policy forbids inline scripts. Without it the form posts and the portal shows a page with the link.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form.desktop-viewer").forEach((form) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector("button");
      const note = form.querySelector(".desktop-note");
      button.disabled = true;
      let answer;
      try {
        const response = await fetch(form.action, {
          method: "POST",
          headers: { "X-CSRFToken": form.elements.csrf_token.value, Accept: "application/json" },
          credentials: "same-origin",
        });
        answer = await response.json().catch(() => ({}));
        if (!response.ok || !answer.link) {
          throw new Error(answer.message || `the portal answered ${response.status}`);
        }
      } catch (error) {
        note.textContent = ` Weasis could not be opened: ${error.message}`;
        note.hidden = false;
        return;
      } finally {
        button.disabled = false;
      }
      // What happens next is the browser's and the system's: a question "Open Weasis?", or nothing
      // when Weasis is not installed. The note says so and keeps the link for a second try.
      const again = document.createElement("a");
      again.href = answer.link;
      again.className = "weasis-link";
      again.textContent = "open it again";
      const install = document.createElement("a");
      install.href = answer.download;
      install.target = "_blank";
      install.rel = "noopener";
      install.textContent = "install Weasis";
      note.replaceChildren(" Opening Weasis\u2026 Nothing happens? ", install, " first, then ", again, ".");
      note.hidden = false;
      window.location.href = answer.link;
    });
  });
});
