// The query pages' behaviour, in a file of its own: the content security policy forbids inline scripts.
// Everything here is a convenience; the pages work without it.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // The study dates count only with "Search: With Study Date": show that by disabling them otherwise.
  const search = document.getElementById("search");
  if (search) {
    const dates = document.querySelectorAll(".study-date input");
    const update = () => dates.forEach((input) => { input.disabled = search.value !== "date"; });
    search.addEventListener("change", update);
    update();
  }

  // The zip page states the size, then starts the download; not again when the user comes back to it.
  const start = document.querySelector("a[data-autostart]");
  const navigation = performance.getEntriesByType("navigation")[0];
  if (start && (!navigation || navigation.type === "navigate")) {
    window.location.assign(start.href);
  }
});

// "Copy study link": ask the portal for the study's fully qualified patient link and put it on the
// clipboard. Browsers may refuse the clipboard (a user option): then the link is shown, selected,
// for copying by hand.
document.addEventListener("DOMContentLoaded", () => {
  const csrf = document.querySelector('meta[name="csrf-token"]');
  document.querySelectorAll("button.copy-link").forEach((button) => {
    button.addEventListener("click", async () => {
      const shown = button.parentElement.querySelector(".copied");
      const field = shown.querySelector("input");
      const note = shown.querySelector(".copy-note");
      let link;
      let warning = "";
      try {
        const response = await fetch(button.dataset.linkUrl, {
          method: "POST",
          headers: { "X-CSRFToken": csrf ? csrf.content : "", Accept: "application/json" },
          credentials: "same-origin",
        });
        if (!response.ok) {
          let reason = `the portal answered ${response.status}`;
          try {
            reason = (await response.json()).message || reason;
          } catch {
            // not the portal's JSON answer: the status says it
          }
          throw new Error(reason);
        }
        const answer = await response.json();
        link = answer.link;
        // A link that will open without the birth-date question: the portal says so.
        warning = answer.warning ? ` ${answer.warning}` : "";
      } catch (error) {
        shown.hidden = false;
        field.value = "";
        note.textContent = ` The link could not be made (${error.message}).`;
        return;
      }
      field.value = link;
      shown.hidden = false;
      try {
        await navigator.clipboard.writeText(link);
        note.textContent = ` Copied to the clipboard.${warning}`;
      } catch {
        field.focus();
        field.select();
        note.textContent = ` The browser did not allow copying: press Ctrl+C (or Cmd+C) to copy it.${warning}`;
      }
    });
  });
});
