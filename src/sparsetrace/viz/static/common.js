// sparsetrace: code shared by the viewer (viewer.js, data from the local server) and the
// self-contained report (report.js, data embedded in the page). No dependencies, no network.
"use strict";

const ST = (() => {
  // viridis, sampled; index 0 = least mass
  const STOPS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
    [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
  const LUT = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (STOPS.length - 1), a = Math.floor(x);
    const b = Math.min(a + 1, STOPS.length - 1), f = x - a;
    for (let c = 0; c < 3; c++) LUT[i * 3 + c] = Math.round(STOPS[a][c] * (1 - f) + STOPS[b][c] * f);
  }
  const LOG_MIN = -4; // block-map colours: log10 mass from 1e-4 (and below) to 1
  const BG = [255, 255, 255]; // not kept / outside the trace

  function level(v) { // mass -> 0..255 on the log scale, -1 for "nothing kept"
    if (!(v > 0)) return -1;
    const t = (Math.log10(v) - LOG_MIN) / -LOG_MIN;
    return Math.max(0, Math.min(255, Math.round(t * 255)));
  }
  function lutCss(i) { return `rgb(${LUT[i * 3]},${LUT[i * 3 + 1]},${LUT[i * 3 + 2]})`; }
  function fmt(x, d = 3) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(1);
    return (+x).toFixed(d);
  }
  function int(x) { return Math.round(x).toLocaleString("en-US"); }
  function esc(s) {
    return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  }
  function legend(el) { // a horizontal colour bar for the log mass scale
    const stops = [];
    for (let i = 0; i <= 10; i++) stops.push(`${lutCss(Math.round(i * 25.5))} ${i * 10}%`);
    el.innerHTML = `<span>1e-4</span><span class="bar" style="background:linear-gradient(to right,${stops.join(",")})"></span><span>1</span>`;
  }

  // A block map on a <canvas>: rows = query blocks, columns = key blocks. `fetchGrid(view, rows,
  // cols)` returns (a promise of) a grid {rows, cols, q0, k0, q_step, k_step, values}; while a new
  // grid is on its way the old one is drawn under the new view, so wheel and drag feel immediate.
  class BlockMap {
    constructor(canvas, opts) {
      this.canvas = canvas; this.ctx = canvas.getContext("2d");
      this.o = opts; this.nQ = opts.nQ; this.nK = opts.nK;
      this.view = { q0: 0, q1: this.nQ, k0: 0, k1: this.nK };
      this.grid = null; this.img = null; this.seq = 0; this.timer = null; this.drag = null;
      canvas.addEventListener("wheel", (e) => {
        e.preventDefault();
        const p = this.frac(e);
        this.zoom(Math.pow(1.2, -e.deltaY / 100), p.x, p.y);
      }, { passive: false });
      canvas.addEventListener("mousedown", (e) => {
        this.drag = { x: e.clientX, y: e.clientY, view: { ...this.view }, moved: false };
      });
      window.addEventListener("mousemove", (e) => {
        if (!this.drag) return;
        const dx = e.clientX - this.drag.x, dy = e.clientY - this.drag.y;
        if (Math.abs(dx) + Math.abs(dy) > 3) this.drag.moved = true;
        if (this.drag.moved) this.panFrom(this.drag.view, dx, dy);
      });
      window.addEventListener("mouseup", (e) => {
        const d = this.drag; this.drag = null;
        if (d && !d.moved && e.target === canvas && this.o.onClick) this.o.onClick(this.at(e));
      });
      canvas.addEventListener("mousemove", (e) => { if (!this.drag && this.o.onHover) this.o.onHover(this.at(e), e); });
      canvas.addEventListener("mouseleave", () => { if (this.o.onHover) this.o.onHover(null); });
    }
    frac(e) {
      const r = this.canvas.getBoundingClientRect();
      return { x: (e.clientX - r.left) / r.width, y: (e.clientY - r.top) / r.height };
    }
    clamp(v) {
      const fit = (a, b, n, minSpan) => {
        let s = Math.min(n, Math.max(minSpan, b - a));
        a = Math.max(0, Math.min(a, n - s));
        return [a, a + s];
      };
      [v.q0, v.q1] = fit(v.q0, v.q1, this.nQ, Math.min(this.nQ, 2));
      [v.k0, v.k1] = fit(v.k0, v.k1, this.nK, Math.min(this.nK, 2));
      return v;
    }
    zoom(factor, fx = 0.5, fy = 0.5) {
      const v = this.view;
      const qc = v.q0 + fy * (v.q1 - v.q0), kc = v.k0 + fx * (v.k1 - v.k0);
      const qs = (v.q1 - v.q0) / factor, ks = (v.k1 - v.k0) / factor;
      this.setView({ q0: qc - fy * qs, q1: qc + (1 - fy) * qs, k0: kc - fx * ks, k1: kc + (1 - fx) * ks });
    }
    panFrom(start, dx, dy) {
      const W = this.canvas.clientWidth, H = this.canvas.clientHeight;
      const dk = (-dx / W) * (start.k1 - start.k0), dq = (-dy / H) * (start.q1 - start.q0);
      this.setView({ q0: start.q0 + dq, q1: start.q1 + dq, k0: start.k0 + dk, k1: start.k1 + dk });
    }
    pan(fx, fy) { // by a fraction of the view
      const v = this.view, dq = fy * (v.q1 - v.q0), dk = fx * (v.k1 - v.k0);
      this.setView({ q0: v.q0 + dq, q1: v.q1 + dq, k0: v.k0 + dk, k1: v.k1 + dk });
    }
    reset() { this.setView({ q0: 0, q1: this.nQ, k0: 0, k1: this.nK }); }
    setView(v) {
      this.view = this.clamp(v);
      this.draw();
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.refresh(), 120);
      if (this.o.onView) this.o.onView(this.view);
    }
    async refresh() {
      const v = this.view, seq = ++this.seq;
      const want = { q0: Math.floor(v.q0), q1: Math.ceil(v.q1), k0: Math.floor(v.k0), k1: Math.ceil(v.k1) };
      const g = await this.o.fetchGrid(want, this.canvas.height, this.canvas.width);
      if (seq !== this.seq || !g) return; // a newer view is on its way
      this.setGrid(g);
    }
    setGrid(g) {
      const img = document.createElement("canvas");
      img.width = g.cols; img.height = g.rows;
      const ictx = img.getContext("2d"), px = ictx.createImageData(g.cols, g.rows), d = px.data;
      for (let i = 0; i < g.values.length; i++) {
        const l = level(g.values[i]);
        if (l < 0) { d[4 * i] = BG[0]; d[4 * i + 1] = BG[1]; d[4 * i + 2] = BG[2]; }
        else { d[4 * i] = LUT[3 * l]; d[4 * i + 1] = LUT[3 * l + 1]; d[4 * i + 2] = LUT[3 * l + 2]; }
        d[4 * i + 3] = 255;
      }
      ictx.putImageData(px, 0, 0);
      this.grid = g; this.img = img;
      this.draw();
      if (this.o.onDraw) this.o.onDraw(g);
    }
    draw() {
      const c = this.ctx, W = this.canvas.width, H = this.canvas.height, v = this.view, g = this.grid;
      c.fillStyle = `rgb(${BG.join(",")})`;
      c.fillRect(0, 0, W, H);
      if (!g) return;
      const X = (k) => ((k - v.k0) / (v.k1 - v.k0)) * W, Y = (q) => ((q - v.q0) / (v.q1 - v.q0)) * H;
      c.imageSmoothingEnabled = false;
      const x0 = X(g.k0), x1 = X(g.k0 + g.cols * g.k_step), y0 = Y(g.q0), y1 = Y(g.q0 + g.rows * g.q_step);
      c.drawImage(this.img, x0, y0, x1 - x0, y1 - y0);
    }
    at(e) { // the block under the mouse and the grid cell holding it
      const p = this.frac(e), v = this.view, g = this.grid;
      const qb = Math.min(this.nQ - 1, Math.floor(v.q0 + p.y * (v.q1 - v.q0)));
      const kb = Math.min(this.nK - 1, Math.floor(v.k0 + p.x * (v.k1 - v.k0)));
      let value = null, cell = null;
      if (g) {
        const r = Math.floor((qb - g.q0) / g.q_step), col = Math.floor((kb - g.k0) / g.k_step);
        if (r >= 0 && r < g.rows && col >= 0 && col < g.cols) {
          value = g.values[r * g.cols + col];
          cell = { q0: g.q0 + r * g.q_step, q1: Math.min(this.nQ, g.q0 + (r + 1) * g.q_step),
            k0: g.k0 + col * g.k_step, k1: Math.min(this.nK, g.k0 + (col + 1) * g.k_step) };
        }
      }
      return { qb, kb, value, cell, reduce: g && g.reduce, clientX: e.clientX, clientY: e.clientY };
    }
  }

  // The overview: one cell per (layer, head), coloured by a metric (linear, min..max of the
  // metric; `opts.colour(value)` -> CSS colour replaces that scale). `onPick(layer, head)` on click;
  // `sel` = [layer, head] is outlined.
  function drawOverview(canvas, matrix, sel, opts = {}) {
    const L = matrix.length, H = matrix[0].length;
    const left = 28, top = 16, cw = Math.max(8, Math.min(36, Math.floor((canvas.width - left) / H)));
    const ch = Math.max(5, Math.min(16, Math.floor(360 / L)));
    canvas.height = top + L * ch + 2;
    canvas.cellBox = { left, top, cw, ch }; // canvas pixels of cell (l, h): left + h*cw, top + l*ch
    const c = canvas.getContext("2d");
    c.fillStyle = "#fff"; c.fillRect(0, 0, canvas.width, canvas.height);
    let lo = Infinity, hi = -Infinity;
    for (const row of matrix) for (const x of row) if (x !== null) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
    c.font = "10px sans-serif"; c.fillStyle = "#444"; c.textAlign = "right"; c.textBaseline = "middle";
    for (let l = 0; l < L; l++) {
      c.fillStyle = "#444";
      if (ch >= 9 || l % 5 === 0) c.fillText(String(l), left - 4, top + l * ch + ch / 2);
      for (let h = 0; h < H; h++) {
        const x = matrix[l][h];
        if (x === null) { c.fillStyle = "#eee"; }
        else if (opts.colour) { c.fillStyle = opts.colour(x); }
        else {
          const t = hi > lo ? (x - lo) / (hi - lo) : 0.5;
          c.fillStyle = lutCss(Math.round(t * 255));
        }
        c.fillRect(left + h * cw, top + l * ch, cw - 1, ch - 1);
      }
    }
    c.textAlign = "center"; c.fillStyle = "#444";
    for (let h = 0; h < H; h++) if (cw >= 14 || h % 4 === 0) c.fillText(String(h), left + h * cw + cw / 2, top / 2);
    if (sel) {
      c.strokeStyle = "#e4002b"; c.lineWidth = 2;
      c.strokeRect(left + sel[1] * cw - 1, top + sel[0] * ch - 1, cw + 1, ch + 1);
    }
    (opts.marks || []).forEach(([l, h]) => {
      c.strokeStyle = "#000"; c.lineWidth = 1; c.strokeRect(left + h * cw + 0.5, top + l * ch + 0.5, cw - 2, ch - 2);
    });
    canvas.onmousemove = (e) => {
      const p = hit(e); if (!p) { canvas.title = ""; return; }
      canvas.title = `layer ${p[0]}, head ${p[1]}: ${fmt(matrix[p[0]][p[1]], 4)}`;
    };
    canvas.onclick = (e) => { const p = hit(e); if (p && opts.onPick) opts.onPick(p[0], p[1]); };
    function hit(e) {
      const r = canvas.getBoundingClientRect();
      const x = (e.clientX - r.left) * (canvas.width / r.width), y = (e.clientY - r.top) * (canvas.height / r.height);
      const h = Math.floor((x - left) / cw), l = Math.floor((y - top) / ch);
      return l >= 0 && l < L && h >= 0 && h < H ? [l, h] : null;
    }
    return { lo, hi };
  }

  const METRIC_HELP = {
    sparsity: "share of causal (query, key) token pairs the masks drop",
    entropy: "entropy (bits) of the kept-block masses per query block, mean over query blocks",
    other: "mass on kept blocks that are neither the sink (block 0) nor the diagonal",
    sink: "mass on key block 0",
    diagonal: "mass on the query block's own (diagonal) key block",
    offdiag: "mass off the diagonal block",
    kurtosis: "receiver-head kurtosis (anchors command)",
    needle_mass: "mass on the needle (niah command)",
  };


  // The layer x source chart of a span's sources (views.sources_view): one column per top passage,
  // one row per layer (layer 0 at the top); a cell's colour is the share of the passage's score that
  // entered it at that layer, scaled to the column's largest, so each column shows where its passage
  // enters. Hover for the numbers.
  function drawSourcesChart(canvas, data) {
    const top = data.top, L = data.num_layers, N = Math.max(1, top.length);
    const left = 28, head = 16, cw = Math.max(14, Math.min(44, Math.floor((canvas.width - left) / N)));
    const ch = Math.max(4, Math.min(12, Math.floor(320 / L)));
    canvas.height = head + L * ch + 2;
    const c = canvas.getContext("2d");
    c.fillStyle = "#fff"; c.fillRect(0, 0, canvas.width, canvas.height);
    c.font = "10px sans-serif"; c.textBaseline = "middle";
    c.fillStyle = "#444"; c.textAlign = "right";
    for (let l = 0; l < L; l++) if (ch >= 9 || l % 5 === 0) c.fillText(String(l), left - 4, head + l * ch + ch / 2);
    c.textAlign = "center";
    top.forEach((p, n) => {
      c.fillStyle = "#444";
      c.fillText(`#${n + 1}`, left + n * cw + cw / 2, head / 2);
      const hi = Math.max(...p.entry.map((x) => x || 0));
      for (let l = 0; l < L; l++) {
        const x = p.entry[l] || 0;
        c.fillStyle = x > 0 && hi > 0 ? lutCss(Math.round((x / hi) * 255)) : "#f2f2f2";
        c.fillRect(left + n * cw, head + l * ch, cw - 1, ch - 1);
      }
    });
    canvas.onmousemove = (e) => {
      const r = canvas.getBoundingClientRect();
      const x = (e.clientX - r.left) * (canvas.width / r.width), y = (e.clientY - r.top) * (canvas.height / r.height);
      const n = Math.floor((x - left) / cw), l = Math.floor((y - head) / ch);
      if (n < 0 || n >= top.length || l < 0 || l >= L) { canvas.title = ""; return; }
      const p = top[n], share = p.score > 0 ? (p.entry[l] || 0) / p.score : 0;
      canvas.title = `source #${n + 1} (tokens ${int(p.token_start)}–${int(p.token_end)}), layer ${l}: ` +
        `${fmt(100 * share, 1)}% of its score entered here`;
    };
  }

  function sourcesLabel(p) { // "L5 41%, L11 22%" from a passage's entry layers
    return p.layers.map(([l, s]) => `L${l} ${Math.round(100 * s)}%`).join(", ");
  }

  function fidelityText(f) { // the manifest's "fidelity" entry (sparsetrace fidelity), briefly
    if (!f || typeof f !== "object") return "";
    const parts = [];
    if ("criterion_passed" in f) parts.push(`two-token criterion ${f.criterion_passed ? "passed" : "failed"}`);
    if ("top1_agreement" in f) parts.push(`top-1 agreement ${fmt(f.top1_agreement)}`);
    if ("kl" in f) parts.push(`KL ${fmt(f.kl, 4)} nats`);
    return parts.length ? ` · fidelity: ${parts.join(", ")}` : "";
  }

  function deviceText(d) { // the manifest's "device": "cpu" or "cuda: <GPU name>" (traces before it: none)
    return typeof d === "string" && d ? ` · traced on ${d}` : "";
  }

  function kText(m) { // "top_k 16", or under a coverage budget (rows of different lengths) what it kept
    if (!m.budget) return `top_k ${m.top_k}`;
    return `coverage ${m.budget.coverage}: ${fmt(m.mean_kept_blocks, 3)} blocks kept per row on average ` +
      `(${m.budget.min_k}..${m.top_k})`;
  }

  return { BlockMap, drawOverview, drawSourcesChart, sourcesLabel, legend, fmt, int, esc, level, fidelityText,
    deviceText, kText, METRIC_HELP };
})();
