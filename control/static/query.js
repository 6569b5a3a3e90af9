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
