// The normlog tab: a plain ES module, no build step, no network beyond this plugin's routes
// (relative URLs; TensorBoard's plugin frame sets <base href="plugin/normlog/">).
// The map is drawn on a canvas at one pixel per cell and scaled up, so 1,000 tensors by
// 1,000 columns is one putImageData; the server has already downsampled the steps.

const VIRIDIS = [ // matplotlib's viridis at 10 even stops: perceptually even, colour-blind safe
  [68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
];
const NAN = [232, 17, 45];       // NaN: red, outside viridis
const POSINF = [255, 140, 0];    // +Inf: orange
const NEGINF = [0, 191, 255];    // -Inf: light blue
const MISSING = [236, 236, 236]; // not logged at that step
const STAT_LABELS = {
  grad_norm: "gradient norm ‖g‖",
  weight_norm: "weight norm ‖w‖",
  update_ratio: "update ratio ‖Δw‖/‖w‖",
  grad_to_weight: "‖g‖/‖w‖",
};
const CURVE_COLOURS = {grad_norm: "#1f77b4", weight_norm: "#2ca02c", update_ratio: "#9467bd"};

const state = {runs: [], statistic: "grad_norm", shown: [], maps: {}, findings: {}, domain: [0, 1]};

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

async function getJson(path, params) {
  const response = await fetch(`${path}?${new URLSearchParams(params)}`);
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

function number(value) { // TensorBoard's JSON spells non-finite numbers as strings
  if (typeof value === "number") return value;
  return {NaN: NaN, Infinity: Infinity, "-Infinity": -Infinity}[value];
}

function format(value) {
  if (Number.isNaN(value)) return "NaN";
  if (value === Infinity) return "+Inf";
  if (value === -Infinity) return "-Inf";
  return value === 0 ? "0" : value.toPrecision(4);
}

function decode(base64, Type) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Type(bytes.buffer);
}

function colour(value, [lo, hi]) {
  if (Number.isNaN(value)) return NAN;
  if (value === Infinity) return POSINF;
  if (value === -Infinity) return NEGINF;
  const log = value > 0 ? Math.log10(value) : -Infinity;
  const t = Math.min(1, Math.max(0, (log - lo) / (hi - lo)));
  const x = t * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

function columnOf(spans, step) { // the column whose span holds `step` (or the nearest one after)
  let lo = 0;
  let hi = spans.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (spans[mid][1] < step) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// -- the page -------------------------------------------------------------------------------

const root = el("div", {class: "nl-app"});
const runSelect = el("select", {class: "nl-run", "aria-label": "run"});
const compareSelect = el("select", {class: "nl-compare", "aria-label": "compare with"});
const statisticSelect = el("select", {class: "nl-statistic", "aria-label": "statistic"});
const status = el("span", {class: "nl-status", role: "status"});
const mapsBox = el("div", {class: "nl-maps"});
const scaleBox = el("div", {class: "nl-scale"});
const findingsList = el("ol", {class: "nl-findings-list"});
const detail = el("section", {class: "nl-detail"});
const tooltip = el("div", {class: "nl-tooltip", role: "tooltip"});

function layout() {
  root.append(
    el(
      "header",
      {class: "nl-controls"},
      el("label", {}, "run ", runSelect),
      el("label", {}, "and below it ", compareSelect),
      el("label", {}, "colour: log10 of ", statisticSelect),
      status,
    ),
    el(
      "div",
      {class: "nl-body"},
      el("div", {class: "nl-left"}, scaleBox, mapsBox),
      el("aside", {class: "nl-findings"}, el("h3", {}, "Findings"), findingsList),
    ),
    detail,
    tooltip,
  );
  for (const select of [runSelect, compareSelect, statisticSelect]) select.addEventListener("change", refresh);
}

async function refresh() {
  state.statistic = statisticSelect.value;
  state.shown = [runSelect.value, compareSelect.value].filter((run, i, all) => run && all.indexOf(run) === i);
  status.textContent = "loading…";
  const width = Math.max(200, mapsBox.clientWidth - 200);
  const columns = Math.min(state.maxColumns, Math.max(50, width));
  try {
    const maps = await Promise.all(
      state.shown.map((run) => getJson("map", {run, statistic: state.statistic, columns})),
    );
    state.shown.forEach((run, i) => {
      const map = maps[i];
      map.values = decode(map.values, Float32Array);
      map.present = decode(map.present, Uint8Array);
      state.maps[run] = map;
    });
    state.domain = domainOf(state.shown.map((run) => state.maps[run]));
    drawScale();
    drawMaps(width);
    // The findings come second: the health rules over every step cost more than the map.
    const pending = state.shown.filter((run) => !(run in state.findings));
    if (pending.length) {
      findingsList.replaceChildren(el("li", {class: "nl-none"}, "computing findings…"));
      const findings = await Promise.all(pending.map((run) => getJson("findings", {run})));
      pending.forEach((run, i) => { state.findings[run] = findings[i].findings; });
      redrawMarkers();
    }
    drawFindings();
    status.textContent = "";
  } catch (error) {
    status.textContent = `could not load: ${error.message}`;
  }
}

function redrawMarkers() {
  for (const run of state.shown) {
    const section = mapsBox.querySelector(`.nl-map[data-run="${CSS.escape(run)}"]`);
    if (!section) continue;
    const cells = section.querySelector(".nl-cells");
    drawMarkers(section.querySelector(".nl-markers"), run, state.maps[run],
      Number(cells.dataset.cellWidth), Number(cells.dataset.cellHeight));
  }
}

function domainOf(maps) { // one colour scale for every run shown: log10 of all finite positive values
  let lo = Infinity;
  let hi = -Infinity;
  for (const map of maps) {
    map.values.forEach((value, i) => {
      if (map.present[i] && Number.isFinite(value) && value > 0) {
        const log = Math.log10(value);
        if (log < lo) lo = log;
        if (log > hi) hi = log;
      }
    });
  }
  if (!Number.isFinite(lo)) return [-1, 1];
  if (hi - lo < 1e-6) return [lo - 0.5, hi + 0.5];
  return [lo, hi];
}

function drawScale() {
  const [lo, hi] = state.domain;
  const width = 320;
  const bar = el("canvas", {class: "nl-scale-bar", width, height: 12});
  const context = bar.getContext("2d");
  for (let x = 0; x < width; x++) {
    const [r, g, b] = colour(10 ** (lo + ((hi - lo) * x) / (width - 1)), state.domain);
    context.fillStyle = `rgb(${r},${g},${b})`;
    context.fillRect(x, 0, 1, 12);
  }
  const ticks = el("div", {class: "nl-scale-ticks", style: `width:${width}px`});
  const step = Math.max(1, Math.ceil((hi - lo) / 6));
  for (let decade = Math.ceil(lo); decade <= Math.floor(hi); decade += step) {
    const left = ((decade - lo) / (hi - lo)) * width;
    ticks.append(el("span", {class: "nl-tick", style: `left:${left}px`}, `1e${decade}`));
  }
  const swatch = (rgb, text) =>
    el("span", {class: "nl-swatch"}, el("i", {style: `background:rgb(${rgb.join(",")})`}), text);
  scaleBox.replaceChildren(
    el("div", {class: "nl-scale-title"}, `log10 ${STAT_LABELS[state.statistic]}: ${format(10 ** lo)} … ${format(10 ** hi)}`),
    el("div", {class: "nl-scale-row"}, el("div", {}, bar, ticks),
      swatch(NAN, "NaN"), swatch(POSINF, "+Inf"), swatch(NEGINF, "-Inf"), swatch(MISSING, "not logged")),
  );
}

function drawMaps(width) {
  mapsBox.replaceChildren(...state.shown.map((run) => drawMap(run, state.maps[run], width)));
}

function drawMap(run, map, width) {
  const [rows, columns] = map.shape;
  const cellW = Math.max(1, Math.min(24, Math.floor(width / Math.max(1, columns))));
  const cellH = rows <= 40 ? 16 : rows <= 150 ? 8 : 4;
  const image = new ImageData(Math.max(1, columns), Math.max(1, rows));
  for (let i = 0; i < rows * columns; i++) {
    const [r, g, b] = map.present[i] ? colour(map.values[i], state.domain) : MISSING;
    image.data.set([r, g, b, 255], i * 4);
  }
  const pixels = el("canvas", {width: image.width, height: image.height});
  pixels.getContext("2d").putImageData(image, 0, 0);
  const cells = el("canvas", {class: "nl-cells", width: columns * cellW, height: rows * cellH});
  cells.dataset.cellWidth = cellW;
  cells.dataset.cellHeight = cellH;
  const context = cells.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(pixels, 0, 0, cells.width, cells.height);
  const markers = el("canvas", {class: "nl-markers", width: cells.width, height: cells.height});
  drawMarkers(markers, run, map, cellW, cellH);

  const labels = el("div", {class: "nl-labels"});
  map.tensors.forEach((tensor, row) => {
    const first = row === 0 || map.modules[row - 1] !== map.modules[row];
    labels.append(
      el(
        "div",
        {
          class: `nl-row${first ? " nl-module-start" : ""}`,
          "data-tensor": tensor,
          "data-row": row,
          title: tensor,
          style: `height:${cellH}px;line-height:${cellH}px;font-size:${Math.min(12, cellH - 2)}px`,
          onclick: () => openTensor(run, tensor, map.spans[columns - 1][1]),
        },
        cellH >= 8 ? tensor : "",
      ),
    );
  });
  const plot = el("div", {class: "nl-plot"}, cells, markers);
  markers.addEventListener("mousemove", (event) => hover(event, run, map, cellW, cellH));
  markers.addEventListener("mouseleave", () => { tooltip.style.display = "none"; });
  markers.addEventListener("click", (event) => {
    const [row, column] = cellAt(event, cellW, cellH);
    if (row < rows && column < columns) openTensor(run, map.tensors[row], map.spans[column][1]);
  });
  const axis = el("div", {class: "nl-axis"},
    `steps ${map.spans.length ? map.spans[0][0] : "-"} … ${map.spans.length ? map.spans[columns - 1][1] : "-"}`
    + (map.spans.some(([a, b]) => a !== b) ? ` in ${columns} columns (each the most extreme value of its steps; NaN/Inf kept)` : ""));
  const scroll = el("div", {class: "nl-scroll"}, el("div", {class: "nl-grid"}, labels, plot));
  return el("section", {class: "nl-map", "data-run": run, "data-spans": JSON.stringify(map.spans)},
    el("h3", {}, `${run} — ${rows} tensors × ${map.spans.length} columns`), scroll, axis);
}

function drawMarkers(canvas, run, map, cellW, cellH, highlight = null) {
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const triangle = (row, step, fill, edge) => { // pointing down at the cell, edged to show on any colour
    const x = (columnOf(map.spans, step) + 0.5) * cellW;
    const y = row * cellH;
    const size = Math.max(4, Math.min(7, cellH - 2));
    context.beginPath();
    context.moveTo(x - size / 2, y);
    context.lineTo(x + size / 2, y);
    context.lineTo(x, y + size);
    context.closePath();
    context.fillStyle = fill;
    context.strokeStyle = edge;
    context.fill();
    context.stroke();
  };
  if (!map.spans.length) return;
  for (const entry of state.findings[run] || []) {
    // the tensors an episode also covers (Finding.members), then the finding itself on top
    for (const member of entry.finding.members || []) {
      const row = map.tensors.indexOf(member.tensor);
      if (row >= 0) triangle(row, member.step, "#000000", "#ffffff");
    }
    if (entry.row !== null) triangle(entry.row, entry.finding.step, entry.origin ? "#ffffff" : "#000000", entry.origin ? "#000000" : "#ffffff");
  }
  if (highlight) {
    context.strokeStyle = "#ff00ff";
    context.lineWidth = 2;
    context.strokeRect(highlight[1] * cellW - 2, highlight[0] * cellH - 2, cellW + 4, cellH + 4);
    context.lineWidth = 1;
  }
}

function cellAt(event, cellW, cellH) {
  const box = event.target.getBoundingClientRect();
  return [Math.floor((event.clientY - box.top) / cellH), Math.floor((event.clientX - box.left) / cellW)];
}

function hover(event, run, map, cellW, cellH) {
  const [row, column] = cellAt(event, cellW, cellH);
  const [rows, columns] = map.shape;
  if (row < 0 || column < 0 || row >= rows || column >= columns) return;
  const i = row * columns + column;
  const [first, last] = map.spans[column];
  const steps = first === last ? `step ${first}` : `steps ${first}–${last}`;
  const value = map.present[i] ? format(map.values[i]) : "not logged";
  tooltip.textContent = `${map.tensors[row]} · ${steps} · ${STAT_LABELS[state.statistic]} ${value}`;
  tooltip.style.display = "block";
  tooltip.style.left = `${event.pageX + 12}px`;
  tooltip.style.top = `${event.pageY + 12}px`;
}

function drawFindings() {
  findingsList.replaceChildren();
  for (const run of state.shown) {
    const entries = state.findings[run] || [];
    if (state.shown.length > 1) findingsList.append(el("li", {class: "nl-findings-run"}, `${run}: ${entries.length}`));
    if (!entries.length) findingsList.append(el("li", {class: "nl-none"}, "no findings"));
    for (const entry of entries) {
      const {rule, tensor, step, message} = entry.finding;
      findingsList.append(
        el(
          "li",
          {
            class: `nl-finding nl-rule-${rule}${entry.origin ? " nl-origin" : ""}`,
            "data-run": run, "data-rule": rule, "data-tensor": tensor, "data-step": step,
            tabindex: 0,
            onclick: () => goTo(run, entry),
          },
          el("b", {}, `${rule}${entry.origin ? " (origin)" : ""}`),
          ` step ${step} · ${tensor}`,
          el("div", {class: "nl-message"}, message),
        ),
      );
    }
  }
}

function goTo(run, entry) { // scroll the map to the finding's cell, outline it, open its tensor
  const section = mapsBox.querySelector(`.nl-map[data-run="${CSS.escape(run)}"]`);
  const map = state.maps[run];
  if (!section || !map) return;
  const cells = section.querySelector(".nl-cells");
  const cellW = Number(cells.dataset.cellWidth);
  const cellH = Number(cells.dataset.cellHeight);
  const column = columnOf(map.spans, entry.finding.step);
  const row = entry.row === null ? 0 : entry.row;
  const scroll = section.querySelector(".nl-scroll");
  const labels = section.querySelector(".nl-labels");
  scroll.scrollLeft = Math.max(0, labels.offsetWidth + column * cellW - scroll.clientWidth / 2);
  scroll.scrollTop = Math.max(0, row * cellH - scroll.clientHeight / 2);
  section.scrollIntoView({block: "nearest"});
  drawMarkers(section.querySelector(".nl-markers"), run, map, cellW, cellH, [row, column]);
  if (entry.row !== null) openTensor(run, entry.finding.tensor, entry.finding.step);
}

// -- one tensor ----------------------------------------------------------------------------

async function openTensor(run, tensor, step) {
  detail.replaceChildren(el("h3", {}, `${run} · ${tensor}`), el("p", {}, "loading…"));
  try {
    const data = await getJson("tensor", {run, tensor});
    const kinds = Object.keys(data.histograms).filter((kind) => data.histograms[kind].length);
    const histogramBox = el("div", {class: "nl-histogram-box"});
    const buttons = kinds.map((kind) =>
      el("button", {type: "button", onclick: () => showHistogram(histogramBox, run, tensor, kind, step)}, kind));
    detail.replaceChildren(
      el("h3", {}, `${run} · ${tensor}`),
      el("div", {class: "nl-detail-row"},
        el("div", {}, el("h4", {}, "norms and update ratio by step (log axis)"), curves(data.curves, step)),
        el("div", {}, el("h4", {}, "histogram ", ...buttons), histogramBox)),
    );
    if (kinds.length) await showHistogram(histogramBox, run, tensor, kinds[0], step);
    else histogramBox.append(el("p", {}, "no histogram logged for this tensor"));
  } catch (error) {
    detail.replaceChildren(el("p", {class: "nl-status"}, `could not load ${tensor}: ${error.message}`));
  }
}

function curves(series, marked) {
  const width = 560;
  const height = 240;
  const pad = {left: 52, right: 12, top: 16, bottom: 28};
  const points = Object.fromEntries(
    Object.entries(series).map(([name, pairs]) => [name, pairs.map(([s, v]) => [s, number(v)])]));
  const all = Object.values(points).flat();
  const steps = all.map(([s]) => s);
  const logs = all.map(([, v]) => v).filter((v) => Number.isFinite(v) && v > 0).map(Math.log10);
  const chart = svg("svg", {class: "nl-curves", width, height, viewBox: `0 0 ${width} ${height}`});
  if (!steps.length) return chart;
  const [s0, s1] = [Math.min(...steps), Math.max(...steps)];
  let [y0, y1] = logs.length ? [Math.min(...logs), Math.max(...logs)] : [-1, 1];
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const x = (s) => pad.left + ((s - s0) / Math.max(1, s1 - s0)) * (width - pad.left - pad.right);
  const y = (log) => pad.top + (1 - (log - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  for (let decade = Math.ceil(y0); decade <= Math.floor(y1); decade++) {
    chart.append(svg("line", {x1: pad.left, x2: width - pad.right, y1: y(decade), y2: y(decade), class: "nl-gridline"}),
      svg("text", {x: pad.left - 4, y: y(decade) + 4, "text-anchor": "end"}, `1e${decade}`));
  }
  chart.append(svg("text", {x: pad.left, y: height - 8}, `${s0}`),
    svg("text", {x: width - pad.right, y: height - 8, "text-anchor": "end"}, `step ${s1}`));
  if (marked !== undefined && marked >= s0 && marked <= s1) {
    chart.append(svg("line", {x1: x(marked), x2: x(marked), y1: pad.top, y2: height - pad.bottom, class: "nl-marked"}));
  }
  let legend = pad.left;
  for (const [name, pairs] of Object.entries(points)) {
    if (!pairs.length) continue;
    let d = "";
    let pen = "M";
    for (const [s, v] of pairs) {
      if (Number.isFinite(v) && v > 0) { d += `${pen}${x(s).toFixed(1)},${y(Math.log10(v)).toFixed(1)}`; pen = "L"; }
      else {
        pen = "M"; // a gap; a non-finite value is marked at the top in NaN's colour
        if (!Number.isFinite(v)) chart.append(svg("rect", {x: x(s) - 2, y: pad.top - 10, width: 4, height: 8,
          fill: `rgb(${(Number.isNaN(v) ? NAN : POSINF).join(",")})`, class: "nl-nonfinite"}));
      }
    }
    chart.append(svg("path", {d, stroke: CURVE_COLOURS[name], fill: "none", class: "nl-curve", "data-statistic": name}));
    chart.append(svg("text", {x: legend, y: 11, fill: CURVE_COLOURS[name]}, STAT_LABELS[name]));
    legend += 150;
  }
  return chart;
}

async function showHistogram(box, run, tensor, kind, step) {
  const data = await getJson("histogram", {run, tensor, kind, step});
  const width = 360;
  const height = 220;
  const pad = {left: 8, right: 8, top: 8, bottom: 28};
  const buckets = data.buckets;
  const chart = svg("svg", {class: "nl-histogram", width, height, viewBox: `0 0 ${width} ${height}`});
  if (buckets.length) {
    const lo = buckets[0][0];
    const hi = buckets[buckets.length - 1][1];
    const top = Math.max(...buckets.map((b) => b[2]), 1);
    const x = (v) => pad.left + ((v - lo) / Math.max(hi - lo, 1e-30)) * (width - pad.left - pad.right);
    for (const [left, right, count] of buckets) {
      const h = (count / top) * (height - pad.top - pad.bottom);
      chart.append(svg("rect", {class: "nl-bar", x: x(left), width: Math.max(1, x(right) - x(left)),
        y: height - pad.bottom - h, height: h}));
    }
    chart.append(svg("text", {x: pad.left, y: height - 8}, format(lo)),
      svg("text", {x: width - pad.right, y: height - 8, "text-anchor": "end"}, format(hi)));
  }
  box.replaceChildren(el("p", {class: "nl-histogram-title"},
    `${kind} at step ${data.step}` + (data.step !== step ? ` (the logged step nearest ${step})` : "")), chart);
}

// -- entry point: TensorBoard's plugin frame imports this module and calls render() ---------

export async function render() {
  document.head.append(el("link", {rel: "stylesheet", href: "static/style.css"}));
  document.body.append(root);
  layout();
  try {
    const listing = await getJson("runs", {});
    state.runs = listing.runs.map((r) => r.run);
    state.maxColumns = listing.max_columns;
    for (const statistic of listing.statistics) {
      statisticSelect.append(el("option", {value: statistic}, STAT_LABELS[statistic] || statistic));
    }
    for (const run of state.runs) runSelect.append(el("option", {value: run}, run));
    compareSelect.append(el("option", {value: ""}, "(none)"));
    for (const run of state.runs) compareSelect.append(el("option", {value: run}, run));
    if (!state.runs.length) {
      status.textContent = "no normlog runs in this logdir";
      return;
    }
    await refresh();
  } catch (error) {
    status.textContent = `could not load: ${error.message}`;
  }
}
