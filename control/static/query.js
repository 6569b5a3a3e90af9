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

// "Copy study link": ask the portal for the study's fully qualified patient link and say until when
// it works before anything is copied; a link that has expired is not offered at all, only what the
// admin can do about it. Copying is then the user's second click. Browsers may refuse the clipboard
// (a user option): then the link is shown, selected, for copying by hand.
document.addEventListener("DOMContentLoaded", () => {
  const csrf = document.querySelector('meta[name="csrf-token"]');

  async function askForLink(url) {
    const response = await fetch(url, {
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
    return response.json();
  }

  document.querySelectorAll("button.copy-link").forEach((button) => {
    const shown = button.parentElement.querySelector(".copied");
    const field = shown.querySelector("input");
    const note = shown.querySelector(".copy-note");
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "button small copy-now";
    copy.textContent = "Copy the link";
    copy.hidden = true;
    const extend = document.createElement("a");
    extend.textContent = "Extend it";
    extend.hidden = true;
    shown.append(copy, " ", extend);
    let period = "";
    // A link that will open without the birth-date question: the portal says so.
    let warning = "";

    button.addEventListener("click", async () => {
      let answer;
      try {
        answer = await askForLink(button.dataset.linkUrl);
      } catch (error) {
        shown.hidden = false;
        field.hidden = true;
        copy.hidden = extend.hidden = true;
        note.textContent = ` The link could not be made (${error.message}).`;
        return;
      }
      shown.hidden = false;
      period = answer.note;
      warning = answer.warning ? ` ${answer.warning}` : "";
      note.textContent = ` ${period}${warning}`;
      shown.classList.toggle("expired", answer.expired);
      // An expired link would only tell the patient that it has expired: it is not handed out.
      field.value = answer.expired ? "" : answer.link;
      field.hidden = copy.hidden = answer.expired;
      extend.hidden = !(answer.expired && answer.extend_url);
      if (answer.extend_url) extend.href = answer.extend_url;
    });

    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(field.value);
        note.textContent = ` ${period} Copied to the clipboard.${warning}`;
      } catch {
        field.focus();
        field.select();
        note.textContent = ` ${period} The browser did not allow copying: press Ctrl+C (or Cmd+C) to copy it.${warning}`;
      }
    });
  });
});
