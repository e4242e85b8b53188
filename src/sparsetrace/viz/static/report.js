// sparsetrace report: everything comes from the JSON embedded in the page (no network).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const D = JSON.parse($("sparsetrace-data").textContent);
  const m = D.info;
  const marks = D.heads.map((p) => [p.layer, p.head]);
  let metric = m.metrics.includes("kurtosis") ? "kurtosis" : "entropy";

  document.title = `sparsetrace report: ${m.model}`;
  $("title").textContent = `sparsetrace report · ${m.model}`;
  $("facts").textContent = `${ST.int(m.num_tokens)} tokens · ${m.num_layers} layers × ${m.num_heads} heads · ` +
    `blocks ${m.block_q}×${m.block_k} · ${ST.kText(m)} · sparsity ${ST.fmt(m.sparsity, 4)}` +
    ST.fidelityText(m.fidelity) + ST.deviceText(m.device);
  $("metric").innerHTML = m.metrics.map((k) => `<option value="${k}">${k}</option>`).join("");
  $("metric").value = metric;
  function overview() {
    const r = ST.drawOverview($("overview"), D.metrics[metric], null, { marks, colour: AUDIT.overviewColour(metric) });
    $("metric-help").textContent = (ST.METRIC_HELP[metric] || "") +
      (Number.isFinite(r.lo) ? ` (${AUDIT.isMissed(metric) ? "range" : "colour"}: ${ST.fmt(r.lo)} … ${ST.fmt(r.hi)})` : "");
    AUDIT.legend($("overview-legend"), metric);
  }
  $("metric").onchange = () => { metric = $("metric").value; overview(); };
  overview();

  function decode(b64) { // uint8 log codes -> masses (see report.py)
    const s = atob(b64), out = new Float32Array(s.length);
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      out[i] = c === 0 ? 0 : Math.pow(2, (-24 * (255 - c)) / 254);
    }
    return out;
  }
  const text = (a, b) => (D.pieces ? D.pieces.slice(a, b).join("") : null);

  let drawn = 0;
  const tip = $("tip");
  D.heads.forEach((p, i) => {
    const sec = document.createElement("section");
    const stats = Object.entries(p.stats).filter(([, v]) => v !== null)
      .map(([k, v]) => `${k} ${ST.fmt(v)}`).join(" · ");
    sec.innerHTML = `<h2>layer ${p.layer}, head ${p.head}</h2><div class="help">${stats}</div>
      <div class="controls"><button data-z="in">+</button><button data-z="out">−</button>
      <button data-z="reset">reset</button><span class="legend"></span></div>
      <canvas class="map" id="map-${i}" width="400" height="400"></canvas>
      <div class="axes"><span class="aq"></span><span class="ak"></span></div>`;
    $("heads").appendChild(sec);
    ST.legend(sec.querySelector(".legend"));
    const g = { ...p.grid, values: decode(p.codes) };
    const axes = (v) => {
      sec.querySelector(".aq").textContent = `query tokens ${ST.int(v.q0 * m.block_q)}–${ST.int(Math.min(m.num_tokens, v.q1 * m.block_q))}`;
      sec.querySelector(".ak").textContent = `key tokens ${ST.int(v.k0 * m.block_k)}–${ST.int(Math.min(m.num_tokens, v.k1 * m.block_k))}`;
    };
    const map = new ST.BlockMap(sec.querySelector("canvas"), {
      nQ: m.num_query_blocks, nK: m.num_key_blocks,
      fetchGrid: async () => g, // the embedded grid; zooming magnifies it
      onView: axes,
      onDraw: () => {
        drawn += 1;
        document.body.dataset.drawn = String(drawn);
        if (!window.__sparsetraceFirstDraw) window.__sparsetraceFirstDraw = performance.now();
      },
      onHover: (h) => {
        if (!h) { tip.style.display = "none"; return; }
        const qa = h.qb * m.block_q, qe = Math.min(m.num_tokens, qa + m.block_q);
        const ka = h.kb * m.block_k, ke = Math.min(m.num_tokens, ka + m.block_k);
        const qt = text(qa, qe), kt = text(ka, ke);
        const cell = h.cell ? ` (max over ${h.cell.q1 - h.cell.q0} × ${h.cell.k1 - h.cell.k0} blocks)` : "";
        tip.innerHTML = `<b>query block ${h.qb}</b> (tokens ${ST.int(qa)}–${ST.int(qe)}) → <b>key block ${h.kb}</b> (tokens ${ST.int(ka)}–${ST.int(ke)})\nmass ${h.value ? ST.fmt(h.value, 4) : "0 (not kept)"}${cell}` +
          (qt !== null ? `\n<b>query text</b><span class="tok">${ST.esc(qt)}</span><b>key text</b><span class="tok">${ST.esc(kt)}</span>` : "");
        tip.style.display = "block";
        tip.style.left = Math.min(window.innerWidth - 450, h.clientX + 14) + "px";
        tip.style.top = Math.min(window.innerHeight - 160, h.clientY + 14) + "px";
      },
    });
    axes(map.view);
    map.setGrid(g);
    sec.querySelector("[data-z=in]").onclick = () => map.zoom(2);
    sec.querySelector("[data-z=out]").onclick = () => map.zoom(0.5);
    sec.querySelector("[data-z=reset]").onclick = () => map.reset();
    window.__sparsetraceMaps = (window.__sparsetraceMaps || []).concat([map]);
  });

  // what the last block read: its sources over all layers (views.sources_view)
  if (D.sources) {
    const src = D.sources, sec = document.createElement("section");
    sec.id = "sources-panel";
    const bars = src.missed_mass ? `, error bars from missed mass (${ST.fmt(src.unattributed, 3)} unattributed)` : "";
    sec.innerHTML = `<h2>What the last block read: its sources over all ${src.num_layers} layers and heads</h2>
      <div class="help">span: tokens ${ST.int(src.span[0])}–${ST.int(src.span[1])}${src.span_text ? ` “${ST.esc(src.span_text.slice(-160))}”` : ""}
      · ${src.aggregate} over heads, residual ${src.residual}, sink as ${src.sink}${bars}</div>
      <div class="text-row"><div><ol id="sources-list"></ol><div id="text"></div></div>
      <div id="sources-box"><div class="help">Where each source enters (layer × source)</div>
      <canvas id="sources-chart" width="340" height="200"></canvas></div></div>`;
    document.querySelector("main").appendChild(sec);
    $("sources-list").innerHTML = src.top.map((p) => `<li>${ST.esc(p.text || "")}
      <span class="meta">tokens ${ST.int(p.token_start)}–${ST.int(p.token_end)} · score ${ST.fmt(p.score, 4)}` +
      (src.missed_mass ? ` [${ST.fmt(p.low, 4)}, ${ST.fmt(p.high, 4)}]` : "") +
      ` · enters at ${ST.sourcesLabel(p)}</span></li>`).join("") || "<li>no source outside the span and the sink</li>";
    ST.drawSourcesChart($("sources-chart"), src);
    if (D.pieces && src.blocks) { // the whole text, shaded by source score per token
      const skip = new Set(src.excluded_blocks), [qa, qe] = src.span;
      const per = D.pieces.map((_, t) => {
        const b = Math.floor(t / m.block_k);
        return skip.has(b) ? 0 : (src.blocks[b] || 0) / m.block_k;
      });
      const hi = Math.max(1e-12, ...per);
      $("text").innerHTML = D.pieces.map((p, t) => `<span${t >= qa && t < qe ? ' class="q"' : ""} ` +
        `style="background:rgba(255,140,0,${Math.sqrt(per[t] / hi).toFixed(3)})">${ST.esc(p)}</span>`).join("");
      $("text").scrollTop = $("text").scrollHeight;
    } else {
      $("text").hidden = true;
    }
    document.body.dataset.sources = "1";
  }
})();
