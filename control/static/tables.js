// On a phone the result tables turn into one card per row (portal.css): each cell then shows the
// name of its column, read here from the table's head, so that the pages keep their tables as they
// are. In a file of its own: the content security policy forbids inline scripts.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.results").forEach((table) => {
    const names = [...table.querySelectorAll("thead th")].map((heading) => heading.textContent.trim());
    table.querySelectorAll("tbody tr").forEach((row) => {
      let column = 0;
      for (const cell of row.cells) {
        if (cell.colSpan === 1 && names[column]) {
          cell.dataset.label = names[column];
        }
        column += cell.colSpan;
      }
    });
  });
});
