"use strict";
(() => {
  // A printed page shows what is collapsed on screen.
  let opened = [];
  addEventListener("beforeprint", () => {
    opened = [...document.querySelectorAll("details:not([open])")];
    opened.forEach((d) => { d.open = true; });
  });
  addEventListener("afterprint", () => {
    opened.forEach((d) => { d.open = false; });
    opened = [];
  });

  const table = document.getElementById("jobs");
  if (!table) return;
  const body = table.tBodies[0];
  const rows = [...body.rows];
  const shown = document.getElementById("shown");
  const filters = [...document.querySelectorAll("[data-filter]")];

  const filter = (wanted) => {
    let count = 0;
    for (const row of rows) {
      const show = wanted === "all" || row.dataset.status === wanted ||
        (wanted === "BROKEN" && row.dataset.log === "broken");
      row.hidden = !show;
      if (show) count += 1;
    }
    for (const button of filters) {
      button.setAttribute("aria-pressed", String(button.dataset.filter === wanted));
    }
    const number = (n) => n.toLocaleString("en-US");
    shown.textContent = wanted === "all"
      ? `Showing all ${number(rows.length)} jobs.`
      : `Showing ${number(count)} of ${number(rows.length)} jobs (${wanted === "BROKEN" ? "log does not verify" : wanted}).`;
  };
  for (const button of filters) {
    button.addEventListener("click", () => filter(button.dataset.filter));
  }

  for (const header of table.tHead.rows[0].cells) {
    const button = header.querySelector("button");
    if (!button) continue;
    button.addEventListener("click", () => {
      const key = header.dataset.key;
      const numeric = header.dataset.type === "number";
      const direction = header.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
      header.setAttribute("aria-sort", direction === 1 ? "ascending" : "descending");
      const value = (row) => (numeric ? Number(row.dataset[key]) : row.dataset[key]);
      rows.sort((a, b) => {
        const x = value(a);
        const y = value(b);
        const order = x < y ? -1 : x > y ? 1 : 0;
        return order * direction || a.dataset.order - b.dataset.order;
      });
      const sorted = document.createDocumentFragment();
      for (const row of rows) sorted.appendChild(row);
      body.appendChild(sorted);
    });
  }
})();
