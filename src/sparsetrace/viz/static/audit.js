// sparsetrace: what the masks missed (the audit; Trace.missed / Trace.audit), drawn in the viewer and the
// report: the colour scale of missed mass, the overview's legend for it, and the strip beside the block map
// (one cell per row of the map: its estimated missed mass; audited rows also show their exact value).
// Loaded after common.js. No dependencies, no network.
"use strict";

const AUDIT = (() => {
  // YlOrRd, sampled: 0 = the row misses nothing (pale) … 1 = it misses all of its attention (dark red)
  const STOPS = [[255, 255, 204], [255, 237, 160], [254, 217, 118], [254, 178, 76], [253, 141, 60],
    [252, 78, 42], [227, 26, 28], [189, 0, 38], [128, 0, 38]];
  const LUT = [];
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (STOPS.length - 1), a = Math.floor(x), b = Math.min(a + 1, STOPS.length - 1), f = x - a;
    LUT.push(`rgb(${[0, 1, 2].map((c) => Math.round(STOPS[a][c] * (1 - f) + STOPS[b][c] * f)).join(",")})`);
  }
  const NONE = "#eee"; // no value (as the overview's NaN cells)
  const TICKS = [0, 0.05, 0.2, 0.5, 1];
  const LEVEL = "90%"; // the per-row estimate's interval (docs/audit.md)
  // overview metrics drawn on the missed-mass scale, and what their colour means
  const METRICS = {
    missed: "estimated missed attention mass: mean over the head's query rows (Trace.missed)",
    missed_audited: "exact missed attention mass: mean over the audited query rows (Trace.audit)",
  };
  Object.assign(ST.METRIC_HELP, METRICS, {
    recall: "recall of the audited rows against the exact block top-k (Trace.audit), mean over the rows",
  });

  // the scale is absolute (0 … 1, the same in every trace and head) and square-root, so that rows missing
  // 1 % and 20 % of their attention stay apart
  function pos(x) { return Math.sqrt(Math.max(0, Math.min(1, x))); }
  function colour(x) {
    return x === null || x === undefined || Number.isNaN(x) ? NONE : LUT[Math.round(pos(x) * 255)];
  }
  function isMissed(metric) { return metric in METRICS; }
  function overviewColour(metric) { return isMissed(metric) ? colour : undefined; }

  function bar(label) { // the colour bar with its ticks (at their square-root positions)
    const stops = [];
    for (let i = 0; i <= 16; i++) stops.push(`${colour((i / 16) ** 2)} ${(i / 16) * 100}%`);
    const ticks = TICKS.map((t) => `<span style="left:${pos(t) * 100}%">${t}</span>`).join("");
    return `<span class="audit-bar-label">${label}</span><span class="audit-bar">` +
      `<span class="bar" style="background:linear-gradient(to right,${stops.join(",")})"></span>` +
      `<span class="ticks">${ticks}</span></span>`;
  }
  // the overview's legend: shown for the missed-mass metrics, hidden for the others
  function legend(el, metric) {
    el.hidden = !isMissed(metric);
    if (!el.hidden) el.innerHTML = bar(`colour: ${metric === "missed" ? "estimated" : "exact"} missed mass (√ scale)`);
  }

  // The strip beside the block map: cell r covers the same query blocks as row r of the map's grid
  // (views.missed_rows groups rows as views.block_grid does). Left part: the cells' mean estimated missed
  // mass; right part: the exact value of audited rows, with a dark edge, blank elsewhere.
  // opts: {nQ, fetchRows(grid) -> promise of views.missed_rows' JSON, onHover(info | null, event)}.
  class Strip {
    constructor(canvas, opts) {
      this.canvas = canvas; this.o = opts; this.data = null; this.view = null; this.seq = 0;
      canvas.addEventListener("mousemove", (e) => { if (this.o.onHover) this.o.onHover(this.at(e), e); });
      canvas.addEventListener("mouseleave", () => { if (this.o.onHover) this.o.onHover(null); });
    }
    async load(grid) { // the map drew `grid`: fetch the missed mass of the same rows
      const seq = ++this.seq;
      const d = await this.o.fetchRows(grid);
      if (seq !== this.seq || !d) return;
      this.data = d;
      this.draw(this.view);
      document.body.dataset.missed = String(+(document.body.dataset.missed || 0) + 1);
    }
    draw(v) {
      this.view = v;
      const c = this.canvas.getContext("2d"), W = this.canvas.width, H = this.canvas.height, d = this.data;
      c.fillStyle = "#fff"; c.fillRect(0, 0, W, H);
      if (!v || !d) return;
      const Y = (q) => ((q - v.q0) / (v.q1 - v.q0)) * H, split = Math.round(W * 0.55);
      for (let r = 0; r < d.rows; r++) {
        const a = d.q0 + r * d.q_step, b = Math.min(d.q1, a + d.q_step), y0 = Y(a), y1 = Y(b);
        if (y1 < 0 || y0 > H) continue;
        c.fillStyle = colour(d.estimate ? d.estimate[r] : null);
        c.fillRect(0, y0, split - 1, Math.max(1, y1 - y0));
      }
      for (const row of d.audited) {
        const y0 = Y(row.query_block), h = Math.max(2, Y(row.query_block + 1) - y0);
        if (y0 + h < 0 || y0 > H) continue;
        c.fillStyle = colour(row.missed); c.fillRect(split, y0, W - split, h);
        c.fillStyle = "#222"; c.fillRect(split, y0, 1, h);
      }
    }
    at(e) { // what the strip says about the row under the mouse
      const d = this.data, v = this.view;
      if (!d || !v) return null;
      const r = this.canvas.getBoundingClientRect(), fy = (e.clientY - r.top) / r.height;
      return { ...this.row(Math.min(this.o.nQ - 1, Math.floor(v.q0 + fy * (v.q1 - v.q0)))), clientX: e.clientX, clientY: e.clientY };
    }
    row(qb) { // the cell holding query block qb and the audited rows inside it (null outside the data)
      const d = this.data;
      if (!d || qb < d.q0 || qb >= d.q1) return null;
      const r = Math.floor((qb - d.q0) / d.q_step), q0 = d.q0 + r * d.q_step, q1 = Math.min(d.q1, q0 + d.q_step);
      const pick = (k) => (d[k] ? d[k][r] : null);
      return { qb, q0, q1, estimate: pick("estimate"), low: pick("low"), high: pick("high"), worst: pick("worst"),
        audited: d.audited.filter((a) => a.query_block >= q0 && a.query_block < q1) };
    }
  }

  // tooltip text (HTML) for a strip cell or for the row of a block-map cell: {where, text}
  function rowText(info, meta) {
    if (!info) return "";
    const n = info.q1 - info.q0, fmt = ST.fmt;
    const where = n > 1 ? `query blocks ${info.q0}–${info.q1 - 1}` : `query block ${info.q0}`;
    const tokens = `tokens ${ST.int(info.q0 * meta.block_q)}–${ST.int(Math.min(meta.num_tokens, info.q1 * meta.block_q))}`;
    let s = "";
    if (info.estimate !== null && info.estimate !== undefined) {
      s += `missed mass ≈ ${fmt(info.estimate)} (${LEVEL} interval ${fmt(info.low)}–${fmt(info.high)})` +
        (n > 1 ? `, mean of ${n} rows; worst row ${fmt(info.worst)}` : "");
    }
    const shown = info.audited.slice(0, 6);
    for (const a of shown) {
      s += `${s ? "\n" : ""}audited block ${a.query_block}: exact missed mass ${fmt(a.missed)}, ` +
        `recall ${a.recall === null ? "– (keeps every candidate)" : fmt(a.recall)}`;
    }
    if (info.audited.length > shown.length) s += `\n… and ${info.audited.length - shown.length} more audited rows`;
    return { where: `<b>${where}</b> (${tokens})`, text: s || "no estimate for this row" };
  }

  return { colour, overviewColour, isMissed, legend, bar, Strip, rowText, METRICS };
})();
