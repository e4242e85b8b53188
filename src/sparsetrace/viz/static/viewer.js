// sparsetrace viewer: talks to the local server (sparsetrace/viz/server.py) and fetches only
// what is on screen: the block map of the viewport (aggregated server-side), token text by range.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const S = { meta: null, layer: 0, head: 0, reduce: "max", overview: null, metric: "entropy",
    sel: null, span: null, recv: new Map(), win: null, shade: "token", by: "head", sources: null, seq: 0 };
  const TEXT_WINDOW = 1500; // tokens shown in the text panel
  const tokCache = new Map();

  async function getJSON(url) {
    const r = await fetch(url);
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
  function fail(e) { $("facts").innerHTML = `<span class="error">${ST.esc(e.message || e)}</span>`; }

  async function tokens(t0, t1) { // token pieces [t0, t1), fetched once per range
    const key = `${t0}:${t1}`;
    if (!tokCache.has(key)) {
      tokCache.set(key, getJSON(`/api/tokens?t0=${t0}&t1=${t1}`).then((r) => r.pieces));
      if (tokCache.size > 400) tokCache.delete(tokCache.keys().next().value);
    }
    return tokCache.get(key);
  }

  async function fetchGrid(v, rows, cols) {
    const url = `/api/grid?layer=${S.layer}&head=${S.head}&q0=${v.q0}&q1=${v.q1}&k0=${v.k0}` +
      `&k1=${v.k1}&rows=${rows}&cols=${cols}&reduce=${S.reduce}`;
    const r = await fetch(url);
    if (!r.ok) { fail(new Error((await r.json()).error)); return null; }
    const g = JSON.parse(r.headers.get("X-Grid"));
    g.values = new Float32Array(await r.arrayBuffer());
    return g;
  }

  // ---------------------------------------------------------------- block map
  let map = null;
  function setupMap() {
    const m = S.meta, canvas = $("map");
    const size = Math.max(200, Math.round(canvas.clientWidth));
    canvas.width = size; canvas.height = Math.max(200, Math.round(canvas.clientHeight)) || size;
    map = new ST.BlockMap(canvas, {
      nQ: m.num_query_blocks, nK: m.num_key_blocks, fetchGrid,
      onDraw: (g) => {
        if (!window.__sparsetraceFirstDraw) {
          window.__sparsetraceFirstDraw = performance.now();
          performance.mark("sparsetrace-first-draw");
        }
        window.__sparsetraceDraws = (window.__sparsetraceDraws || 0) + 1;
        document.body.dataset.drawn = String(window.__sparsetraceDraws);
        if (strip) strip.load(g); // the missed mass of the same rows
        $("map-title").textContent = `Block map: layer ${S.layer}, head ${S.head}` +
          (g.q_step > 1 || g.k_step > 1 ? ` (each cell: ${g.q_step} × ${g.k_step} blocks, ${g.reduce})` : " (one cell per block)");
      },
      onView: axes, onHover: hover,
      onClick: (p) => { if (p.cell) { setBy("head"); selectQuery(p.cell.q0, p.cell.q1); } },
    });
    axes(map.view);
  }
  function axes(v) {
    const m = S.meta;
    $("axis-q").textContent = `query tokens ${ST.int(v.q0 * m.block_q)}–${ST.int(Math.min(m.num_tokens, v.q1 * m.block_q))} (rows)`;
    $("axis-k").textContent = `key tokens ${ST.int(v.k0 * m.block_k)}–${ST.int(Math.min(m.num_tokens, v.k1 * m.block_k))} (columns)`;
    if (strip) strip.draw(v);
  }
  function showHead(layer, head) {
    const m = S.meta;
    S.layer = Math.max(0, Math.min(m.num_layers - 1, layer | 0));
    S.head = Math.max(0, Math.min(m.num_heads - 1, head | 0));
    $("layer").value = S.layer; $("head").value = S.head;
    map.refresh();
    drawOverview();
    if (S.sel && S.by === "head") selectQuery(S.sel[0], S.sel[1]); // sources do not depend on the head
  }

  let hoverTimer = null;
  function hover(p, e) {
    const tip = $("tip");
    clearTimeout(hoverTimer);
    if (!p) { tip.style.display = "none"; return; }
    const m = S.meta, qa = p.qb * m.block_q, qe = Math.min(m.num_tokens, qa + m.block_q);
    const ka = p.kb * m.block_k, ke = Math.min(m.num_tokens, ka + m.block_k);
    const cellNote = p.cell && (p.cell.q1 - p.cell.q0 > 1 || p.cell.k1 - p.cell.k0 > 1)
      ? ` (${p.reduce} over a cell of ${p.cell.q1 - p.cell.q0} × ${p.cell.k1 - p.cell.k0} blocks)` : "";
    const head = `<b>query block ${p.qb}</b> (tokens ${ST.int(qa)}–${ST.int(qe)}) → <b>key block ${p.kb}</b> (tokens ${ST.int(ka)}–${ST.int(ke)})\nmass ${p.value ? ST.fmt(p.value, 4) : "0 (not kept)"}${cellNote}` + missedNote(p.qb);
    tip.innerHTML = head;
    tip.style.display = "block";
    tip.style.left = Math.min(window.innerWidth - 450, p.clientX + 14) + "px";
    tip.style.top = Math.min(window.innerHeight - 160, p.clientY + 14) + "px";
    hoverTimer = setTimeout(async () => {
      const [qt, kt] = await Promise.all([tokens(qa, qe), tokens(ka, ke)]);
      if (tip.style.display === "none") return;
      tip.innerHTML = head + `\n<b>query text</b><span class="tok">${ST.esc(qt.join(""))}</span><b>key text</b><span class="tok">${ST.esc(kt.join(""))}</span>`;
    }, 60);
  }

  // ---------------------------------------------------------------- overview
  async function pollOverview() {
    try {
      S.overview = await getJSON("/api/overview");
    } catch (e) { $("overview-status").textContent = String(e.message || e); return; }
    const o = S.overview;
    $("overview-status").textContent = o.error ? `overview failed: ${o.error}`
      : o.done_layers < o.num_layers ? `computing: ${o.done_layers}/${o.num_layers} layers` : "";
    drawOverview();
    if (o.done_layers < o.num_layers && !o.error) setTimeout(pollOverview, 1000);
  }
  function drawOverview() {
    const o = S.overview;
    if (!o || !o.metrics[S.metric]) return;
    $("metric-help").textContent = ST.METRIC_HELP[S.metric] || "";
    const r = ST.drawOverview($("overview"), o.metrics[S.metric], [S.layer, S.head],
      { onPick: showHead, colour: AUDIT.overviewColour(S.metric) });
    if (Number.isFinite(r.lo)) $("metric-help").textContent += ` (${AUDIT.isMissed(S.metric) ? "range" : "colour"}: ${ST.fmt(r.lo)} … ${ST.fmt(r.hi)})`;
    AUDIT.legend($("overview-legend"), S.metric);
  }

  // ---------------------------------------------------------------- missed mass of the rows (the audit)
  let strip = null; // the strip beside the block map (static/audit.js); none for traces without an audit
  function setupStrip() {
    const a = S.meta.audit || {}, canvas = $("missed-strip"), mapCanvas = $("map");
    if (!a.has_missed && !a.has_audit) return;
    canvas.hidden = false;
    canvas.height = mapCanvas.height;
    canvas.style.height = mapCanvas.clientHeight + "px";
    strip = new AUDIT.Strip(canvas, {
      nQ: S.meta.num_query_blocks,
      fetchRows: (g) => getJSON(`/api/missed?layer=${S.layer}&head=${S.head}&q0=${g.q0}&q1=${g.q1}` +
        `&rows=${mapCanvas.height}`).catch((e) => { fail(e); return null; }),
      onHover: (info, e) => {
        const tip = $("tip");
        if (!info) { tip.style.display = "none"; return; }
        const t = AUDIT.rowText(info, S.meta);
        tip.innerHTML = `${t.where}\n${t.text}`;
        tip.style.display = "block";
        tip.style.left = Math.min(window.innerWidth - 450, e.clientX + 14) + "px";
        tip.style.top = Math.min(window.innerHeight - 160, e.clientY + 14) + "px";
      },
    });
    strip.draw(map.view);
    const parts = [a.has_missed && "left: the estimate (mean of the cell's rows)",
      a.has_audit && "right: the exact value of audited rows (dark edge)"].filter(Boolean);
    $("missed-help").hidden = false;
    $("missed-help").innerHTML = AUDIT.bar("strip left of the map: missed attention mass per query row") +
      `<span>${parts.join("; ")}. Hover it for the interval and the recall.</span>`;
    window.__sparsetraceStrip = strip;
  }
  function missedNote(qb) { // the row's missed mass, for the block map's tooltip
    const info = strip && strip.row(qb);
    return info ? `\n${AUDIT.rowText(info, S.meta).text}` : "";
  }

  // ---------------------------------------------------------------- text shaded by received mass
  function setBy(by) {
    S.by = by;
    document.querySelector(`input[name=by][value=${by}]`).checked = true;
    if (by === "head") $("sources-box").hidden = true;
  }
  async function selectQuery(q0, q1) {
    const m = S.meta, seq = ++S.seq;
    S.sel = [q0, q1];
    S.span = [q0 * m.block_q, Math.min(m.num_tokens, q1 * m.block_q)];
    const r = await getJSON(`/api/received?layer=${S.layer}&head=${S.head}&q0=${q0}&q1=${q1}`);
    if (seq !== S.seq) return; // a newer selection won
    S.recv = new Map(r.blocks.map((b, i) => [b, r.mass[i]]));
    const end = Math.min(m.num_tokens, q1 * m.block_q);
    S.win = [Math.max(0, end - TEXT_WINDOW), end];
    const top = r.blocks.map((b, i) => [b, r.mass[i]]).sort((a, b) => b[1] - a[1]).slice(0, 8);
    $("top-blocks").innerHTML = "strongest key blocks: " + top.map(([b, x]) =>
      `<button data-b="${b}">tokens ${ST.int(b * m.block_k)}… (${ST.fmt(x, 3)})</button>`).join("");
    for (const btn of $("top-blocks").querySelectorAll("button")) {
      btn.onclick = () => {
        const c = +btn.dataset.b * m.block_k;
        S.win = [Math.max(0, c - TEXT_WINDOW / 2), Math.min(m.num_tokens, c + TEXT_WINDOW / 2)];
        renderText();
      };
    }
    $("text-title").textContent = `Text shaded by attention received from query tokens ` +
      `${ST.int(q0 * m.block_q)}–${ST.int(Math.min(m.num_tokens, q1 * m.block_q))} (layer ${S.layer}, head ${S.head})`;
    await renderText();
  }

  // what tokens [t0, t1) read, through every layer and head (server: views.sources_view)
  async function selectSources(t0, t1) {
    const m = S.meta, seq = ++S.seq;
    setBy("sources");
    S.span = [t0, t1];
    S.sel = [Math.floor(t0 / m.block_q), Math.floor((t1 - 1) / m.block_q) + 1];
    const what = `tokens ${ST.int(t0)}–${ST.int(t1)}`;
    $("text-title").textContent = `Sources of ${what} over all ${m.num_layers} layers and heads: computing…`;
    let r;
    try {
      r = await getJSON(`/api/sources?t0=${t0}&t1=${t1}&top=8`);
    } catch (e) { $("text-title").textContent = `Sources of ${what}: ${e.message || e}`; return; }
    if (seq !== S.seq) return;
    S.sources = r;
    S.recv = new Map();
    r.blocks.forEach((x, b) => { if (x > 0 && !r.excluded_blocks.includes(b)) S.recv.set(b, x); });
    S.win = [Math.max(0, t1 - TEXT_WINDOW), t1];
    $("top-blocks").innerHTML = "strongest sources: " + r.top.map((p, i) =>
      `<button data-t="${p.token_start}" title="${ST.esc(p.text || "")}">#${i + 1} tokens ${ST.int(p.token_start)}–${ST.int(p.token_end)} ` +
      `(${ST.fmt(p.score, 3)}; ${ST.sourcesLabel(p)})</button>`).join("");
    for (const btn of $("top-blocks").querySelectorAll("button")) {
      btn.onclick = () => {
        const c = +btn.dataset.t;
        S.win = [Math.max(0, c - TEXT_WINDOW / 2), Math.min(m.num_tokens, c + TEXT_WINDOW / 2)];
        renderText();
      };
    }
    const bars = r.missed_mass ? `; error bars from missed mass, ${ST.fmt(r.unattributed, 3)} unattributed` : "";
    $("text-title").textContent = `Text shaded by the sources of ${what} over all ${m.num_layers} layers and heads ` +
      `(${r.aggregate} over heads, residual ${r.residual}${bars})`;
    $("sources-box").hidden = false;
    ST.drawSourcesChart($("sources-chart"), r);
    await renderText();
    document.body.dataset.sources = String(+(document.body.dataset.sources || 0) + 1);
  }
  async function renderText() {
    const m = S.meta, [t0, t1] = S.win;
    const pieces = await tokens(t0, t1);
    const perTok = pieces.map((_, i) => (S.recv.get(Math.floor((t0 + i) / m.block_k)) || 0) / m.block_k);
    let val = perTok;
    if (S.shade === "sentence") { // spread each sentence's total over its tokens
      val = new Array(pieces.length).fill(0);
      let start = 0, sum = 0;
      for (let i = 0; i < pieces.length; i++) {
        sum += perTok[i];
        if (/[.!?]\s*$|\n/.test(pieces[i]) || i === pieces.length - 1) {
          for (let j = start; j <= i; j++) val[j] = sum;
          start = i + 1; sum = 0;
        }
      }
    }
    const hi = Math.max(1e-12, ...val);
    const [qa, qe] = S.span;
    $("text").innerHTML = pieces.map((p, i) => {
      const a = Math.sqrt(val[i] / hi), t = t0 + i;
      const q = t >= qa && t < qe ? ' class="q"' : "";
      return `<span data-t="${t}"${q} style="background:rgba(255,140,0,${a.toFixed(3)})">${ST.esc(p)}</span>`;
    }).join("");
  }
  function textSelection() {
    const sel = window.getSelection();
    if (!sel || sel.isCollapsed || !S.meta) return;
    const tok = (node) => { const el = node && (node.nodeType === 1 ? node : node.parentElement); return el && el.dataset && el.dataset.t !== undefined ? +el.dataset.t : null; };
    const a = tok(sel.anchorNode), b = tok(sel.focusNode);
    if (a === null || b === null) return;
    selectSources(Math.min(a, b), Math.max(a, b) + 1);
  }

  // ---------------------------------------------------------------- start
  async function start() {
    try {
      S.meta = await getJSON("/api/meta");
    } catch (e) { fail(e); return; }
    const m = S.meta;
    document.title = `sparsetrace: ${m.model}`;
    $("title").textContent = `sparsetrace · ${m.model}`;
    $("facts").textContent = `${ST.int(m.num_tokens)} tokens · ${m.num_layers} layers × ${m.num_heads} heads · ` +
      `blocks ${m.block_q}×${m.block_k} · ${ST.kText(m)} of up to ${ST.int(m.num_key_blocks)} key blocks · ` +
      `sparsity ${ST.fmt(m.sparsity, 4)}` + ST.fidelityText(m.fidelity) + ST.deviceText(m.device);
    $("layer").max = m.num_layers - 1; $("head").max = m.num_heads - 1;
    $("metric").innerHTML = m.metrics.map((k) => `<option value="${k}">${k}</option>`).join("");
    $("metric").value = S.metric = m.metrics.includes("kurtosis") ? "kurtosis" : m.metrics.includes("missed") ? "missed" : "entropy";
    ST.legend($("legend"));
    setupMap();
    setupStrip();
    [S.layer, S.head] = m.default_head;
    $("layer").value = S.layer; $("head").value = S.head;
    await map.refresh(); // first picture first; the overview follows
    pollOverview();
    $("metric").onchange = () => { S.metric = $("metric").value; drawOverview(); };
    $("layer").onchange = $("head").onchange = () => showHead(+$("layer").value, +$("head").value);
    $("reduce").onchange = () => { S.reduce = $("reduce").value; map.refresh(); };
    $("zoom-in").onclick = () => map.zoom(2);
    $("zoom-out").onclick = () => map.zoom(0.5);
    $("reset").onclick = () => map.reset();
    $("left").onclick = () => map.pan(-0.25, 0); $("right").onclick = () => map.pan(0.25, 0);
    $("up").onclick = () => map.pan(0, -0.25); $("down").onclick = () => map.pan(0, 0.25);
    for (const r of document.querySelectorAll("input[name=shade]")) {
      r.onchange = () => { S.shade = r.value; if (S.sel) renderText(); };
    }
    for (const r of document.querySelectorAll("input[name=by]")) {
      r.onchange = () => {
        if (!S.span) return;
        if (r.value === "sources") selectSources(S.span[0], S.span[1]);
        else { setBy("head"); selectQuery(S.sel[0], S.sel[1]); }
      };
    }
    $("text").addEventListener("mouseup", textSelection);
    // start with the last query block selected: the text panel then shows the end of the text
    selectQuery(Math.max(0, m.num_query_blocks - 1), m.num_query_blocks);
    window.__sparsetrace = { S, map, showHead, selectQuery, selectSources };
  }
  start();
})();
