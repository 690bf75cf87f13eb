// elastic-moe ops dashboard: polls dashboard/api/state every second and redraws every panel.
"use strict";
const base = location.pathname.replace(/\/$/, "");
const $ = (id) => document.getElementById(id);
const fmt = (x, d = 1) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));
const COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
let chart = null;

function quantile(h, q) {
  if (!h || !h.count) return null;
  let seen = 0;
  const bounds = [...h.buckets, Infinity];
  for (let i = 0; i < h.counts.length; i++) {
    seen += h.counts[i];
    if (seen >= q * h.count) return bounds[i];
  }
  return Infinity;
}

function drawGroups(state) {
  const snap = state.snapshot, deps = snap.deployments || {};
  const html = [];
  for (let g = 0; g < state.num_groups; g++) {
    const d = deps["ExpertGroup-" + g] || {};
    const ok = (d.status || "").toUpperCase() === "HEALTHY" || (d.status || "").toUpperCase() === "UPSCALING" || (d.status || "").toUpperCase() === "DOWNSCALING";
    html.push(`<div class="group ${ok ? "healthy" : "unhealthy"}">ExpertGroup-${g}: ` +
      `<b data-testid="replicas-group-${g}">${d.running ?? 0}</b> running / ` +
      `<span data-testid="desired-group-${g}">${d.desired ?? 0}</span> desired <small>${d.status || ""}</small></div>`);
  }
  $("groups").innerHTML = html.join("");
  const rows = (snap.replicas || []).slice().sort((a, b) => a.group - b.group).map((r) =>
    `<tr><td>${r.group}</td><td>${r.replica_id}</td><td>${(r.node_id || "").slice(0, 8)}</td>` +
    `<td>${(r.gpu_ids || []).join(",") || "–"}</td><td>${r.device}</td><td>v${(r.placement_versions || []).join(",v")}</td></tr>`);
  document.querySelector("#replicas tbody").innerHTML = rows.join("");
}

function placementOf(state) {
  const active = state.snapshot.placement && state.snapshot.placement.active;
  return active ? JSON.parse(active) : null;
}

function drawHeatmap(state) {
  const loads = (state.snapshot.loads || {}).expert_loads || {};
  const placement = placementOf(state);
  const layers = Object.keys(loads).sort((a, b) => a - b);
  let max = 0, hottest = null;
  for (const l of layers) loads[l].forEach((v, e) => { if (v > max) { max = v; hottest = [l, e]; } });
  const holder = (l, e) => {
    if (!placement) return "";
    const gs = placement.groups.map((g, i) => ((g[l] || []).includes(e) ? i : null)).filter((x) => x !== null);
    return gs.join("+");
  };
  const n = layers.length ? loads[layers[0]].length : 0;
  let html = "<table><tr><th></th>" + Array.from({ length: n }, (_, e) => `<th>${e}</th>`).join("") + "</tr>";
  for (const l of layers) {
    html += `<tr><th>L${l}</th>`;
    loads[l].forEach((v, e) => {
      const a = max > 0 ? v / max : 0;
      html += `<td data-testid="cell" data-layer="${l}" data-expert="${e}" data-load="${v}" ` +
        `style="background: rgba(214,39,40,${a.toFixed(3)})" title="layer ${l} expert ${e}: ${fmt(v)} tok/s, group ${holder(l, e)}">${holder(l, e)}</td>`;
    });
    html += "</tr>";
  }
  $("heatmap").innerHTML = html + "</table>";
  $("hottest").textContent = hottest ? `layer ${hottest[0]} expert ${hottest[1]} (${fmt(max)} tok/s)` : "–";
}

function drawChart(state) {
  const hist = state.history;
  if (!hist.length || typeof uPlot === "undefined") return;
  const t0 = hist[0].time;
  const data = [hist.map((p) => p.time - t0)];
  const series = [{ label: "s" }];
  for (let g = 0; g < state.num_groups; g++) {
    data.push(hist.map((p) => (p.groups[g] || {}).running ?? null));
    series.push({ label: `group ${g} running`, stroke: COLORS[g % COLORS.length], width: 2 });
    data.push(hist.map((p) => (p.groups[g] || {}).desired ?? null));
    series.push({ label: `group ${g} desired`, stroke: COLORS[g % COLORS.length], dash: [6, 4] });
  }
  const marks = state.events.map((e) => e.time - t0);
  const opts = {
    width: $("chart").clientWidth || 560, height: 220, series,
    axes: [{ label: "seconds" }, { label: "replicas" }],
    scales: { x: { time: false }, y: { range: [0, Math.max(2, ...data.slice(1).flat().filter((x) => x !== null)) + 1] } },
    hooks: { draw: [(u) => {
      const ctx = u.ctx; ctx.save(); ctx.strokeStyle = "#888"; ctx.setLineDash([2, 3]);
      for (const x of marks) { const px = u.valToPos(x, "x", true); ctx.beginPath(); ctx.moveTo(px, u.bbox.top); ctx.lineTo(px, u.bbox.top + u.bbox.height); ctx.stroke(); }
      ctx.restore();
    }] },
  };
  if (chart && chart.series.length === series.length) chart.setData(data);
  else { if (chart) chart.destroy(); chart = new uPlot(opts, data, $("chart")); }
  $("events").innerHTML = state.events.slice(-20).reverse().map((e) => {
    const at = new Date(e.time * 1000).toLocaleTimeString();
    return e.kind === "autoscale"
      ? `<li>${at} autoscale: group ${e.group} ${e.from} → ${e.to}</li>`
      : `<li>${at} re-placement v${e.from_version} → v${e.to_version} (imbalance ${fmt(e.imbalance_before, 2)} → predicted ${fmt(e.imbalance_predicted, 2)})</li>`;
  }).join("");
}

function perRouter(r) {
  // one line per Router replica when there are several (each publishes its own stats)
  const routers = Object.entries(r.routers || {});
  if (routers.length < 2) return [];
  return [["per router", routers.map(([id, s]) =>
    `<div data-testid="router-row">${id}: hit rate ${fmt((s.prefix_cache_hit_rate || 0) * 100)} %, ` +
    `${s.running ?? 0} running / ${s.waiting ?? 0} waiting, KV ${fmt((s.kv_usage || 0) * 100)} %</div>`).join("")]];
}

function drawLatency(state) {
  const r = state.snapshot.router || {};
  const ms = (x) => (x === null ? "–" : x === Infinity ? "> 30 s" : `${fmt(x * 1000, 0)} ms`);
  const rows = [
    ["TTFT p50 / p99", `${ms(quantile(r.ttft_s, 0.5))} / ${ms(quantile(r.ttft_s, 0.99))}`],
    ["TPOT p50 / p99", `${ms(quantile(r.tpot_s, 0.5))} / ${ms(quantile(r.tpot_s, 0.99))}`],
    ["expert call p50 / p99", `${ms(quantile(r.dispatch_latency_s, 0.5))} / ${ms(quantile(r.dispatch_latency_s, 0.99))}`],
    ["KV cache use", `${fmt((r.kv_usage || 0) * 100)} %`],
    ["prefix-cache hit rate", `<span data-testid="prefix-hit-rate">${fmt((r.prefix_cache_hit_rate || 0) * 100)}</span> % (${r.prefix_cache_hits ?? 0} / ${r.prefix_cache_queries ?? 0} prompt tokens, ${r.prefix_cache_blocks ?? 0} blocks cached)`],
    ["running / waiting", `${r.running ?? "–"} / ${r.waiting ?? "–"}`],
    ...perRouter(r),
    ["failovers (recent)", `<span data-testid="failovers">${r.failovers ?? 0}</span>`],
    ["rejected", Object.entries(state.snapshot.rejected || {}).map(([k, v]) => `${k}: ${v}`).join(", ") || "0"],
  ];
  document.querySelector("#latency tbody").innerHTML = rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join("");
}

async function refresh() {
  try {
    const res = await fetch(base + "/api/state");
    const state = await res.json();
    if (!state.snapshot || !state.snapshot.router) return;
    const last = state.history[state.history.length - 1] || {};
    $("placement-version").textContent = "v" + (state.snapshot.placement.active_version ?? 0);
    $("imbalance").textContent = fmt(state.snapshot.loads.imbalance, 2);
    $("throughput").textContent = fmt(last.tokens_per_s, 1);
    drawGroups(state); drawHeatmap(state); drawChart(state); drawLatency(state);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("updated").textContent = "no data: " + e;
  }
}

async function act(path, body) {
  const res = await fetch(base + path, {
    method: "POST", headers: { "content-type": "application/json", "x-emoe-admin-token": $("admin-token").value },
    body: JSON.stringify(body || {}),
  });
  $("action-result").textContent = `${res.status}: ${JSON.stringify(await res.json())}`;
}

$("scale").onclick = () => act("/api/scale", { group: +$("scale-group").value, replicas: +$("scale-replicas").value });
$("release").onclick = () => act("/api/scale", { group: +$("scale-group").value, replicas: null });
$("replace").onclick = () => act("/api/replace");
refresh();
setInterval(refresh, 1000);
