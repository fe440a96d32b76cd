// zerver trace pages: the waterfall's span details, read from the JSON API and
// written with textContent only (span names and attributes come from requests).
"use strict";
(function () {
  const table = document.getElementById("waterfall");
  if (!table) return;
  let trace = null;
  const loaded = fetch(table.dataset.api, { headers: { accept: "application/json" } })
    .then((r) => (r.ok ? r.json() : null))
    .then((data) => { trace = data; });

  function cells(row, values) {
    for (const v of values) {
      const td = document.createElement("td");
      td.textContent = typeof v === "string" ? v : JSON.stringify(v);
      row.appendChild(td);
    }
  }

  function show(spanId) {
    const span = trace && trace.spans.find((s) => s.span_id === spanId);
    if (!span) return;
    const box = document.getElementById("details");
    document.getElementById("details-name").textContent =
      span.name + " (" + span.kind + ", " + span.duration_ms.toFixed(3) + " ms)";
    document.getElementById("details-status").textContent =
      "status " + span.status.code + (span.status.message ? ": " + span.status.message : "") +
      "; span " + span.span_id;
    const attrs = document.getElementById("details-attributes");
    attrs.replaceChildren();
    for (const [k, v] of Object.entries(span.attributes)) cells(attrs.insertRow(), [k, v]);
    for (const seg of span.segments) {
      cells(attrs.insertRow(), ["segment " + seg.phase,
        (seg.end_ms - seg.start_ms).toFixed(3) + " ms at +" + seg.start_ms.toFixed(3) + " ms"]);
    }
    const events = document.getElementById("details-events");
    events.replaceChildren();
    for (const e of span.events) cells(events.insertRow(), ["+" + e.time_ms.toFixed(3) + " ms", e.name, e.attributes]);
    box.hidden = false;
  }

  table.addEventListener("click", (ev) => {
    const row = ev.target.closest("tr.span");
    if (!row) return;
    for (const r of table.querySelectorAll("tr.selected")) r.classList.remove("selected");
    row.classList.add("selected");
    loaded.then(() => show(row.dataset.spanId));
  });
})();
