document.querySelectorAll("table.sortable th").forEach(header => header.onclick = () => {
  const body = header.closest("table").tBodies[0], column = header.cellIndex;
  const ascending = header.dataset.order !== "asc";
  header.dataset.order = ascending ? "asc" : "desc";
  const key = row => { const text = row.cells[column].dataset.sort ?? row.cells[column].textContent;
                       const number = parseFloat(text); return isNaN(number) ? text : number; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1); }).forEach(row => body.appendChild(row));
});
