// taskstream console: refresh the page's live figures from /api/state. No build step, no dependencies.
"use strict";
(function () {
  const body = document.body;
  const every = Math.max(200, Number(body.dataset.refreshMs) || 1000);
  const sampled = document.getElementById("sampled");
  const banner = document.getElementById("banner");
  let loadingLetters = false;

  function number(v) {
    if (v === null || v === undefined) return "-";
    return Number.isInteger(v) ? String(v) : v.toFixed(1);
  }
  function rate(v, signed) {
    if (v === null || v === undefined) return "-";
    return (signed && v >= 0 ? "+" : "") + v.toFixed(1) + "/s";
  }
  function rates(el, map) {
    el.replaceChildren();
    const names = Object.keys(map || {});
    if (!names.length) {
      const dash = document.createElement("span");
      dash.className = "muted";
      dash.textContent = "-";
      el.append(dash);
    }
    for (const name of names) {
      const span = document.createElement("span");
      span.className = "rate";
      span.textContent = name + " " + rate(map[name], false);
      el.append(span);
    }
  }
  function spark(svg, values) {
    const line = svg.querySelector("polyline");
    if (!line || !values || values.length < 2) return;
    const top = Math.max(1, ...values);
    const step = 120 / (values.length - 1);
    line.setAttribute("points", values.map((v, i) => (i * step).toFixed(1) + "," + (23 - (v / top) * 22).toFixed(1)).join(" "));
  }
  function show(el, field, figures) {
    if (!figures || !(field in figures)) return;
    const value = figures[field];
    if (field === "history") spark(el, value);
    else if (field === "rates") rates(el, value);
    else if (field === "depth_rate" || field === "dead_letter_rate") el.textContent = rate(value, true);
    else if (field === "error") el.textContent = value || "";
    else el.textContent = number(value);
  }
  function figuresFor(el, state) {
    const holder = el.closest("[data-queue],[data-stage]");
    if (!holder) return null;
    if (holder.dataset.queue !== undefined) return state.queues[holder.dataset.queue];
    const table = holder.closest("[data-pipeline]");
    const stages = table && state.pipelines[table.dataset.pipeline];
    return stages ? stages[holder.dataset.stage] : null;
  }
  async function refreshLetters(state) {
    const box = document.getElementById("dead-letters");
    if (!box || loadingLetters) return;
    const figures = state.queues[box.dataset.queue];
    if (!figures) return;
    const depth = figures.dead_letter_depth === null ? "" : String(figures.dead_letter_depth);
    if (depth === box.dataset.depth) return;
    loadingLetters = true;
    try {
      const response = await fetch(box.dataset.fragment, { headers: { Accept: "text/html" } });
      if (response.ok) {
        box.innerHTML = await response.text();
        box.dataset.depth = depth;
      }
    } finally {
      loadingLetters = false;
    }
  }
  async function refreshTask() {
    const task = document.getElementById("task");
    if (!task || task.dataset.done === "yes") return;
    const response = await fetch("/api/tasks/" + encodeURIComponent(task.dataset.taskId));
    if (!response.ok) return;
    const record = await response.json();
    if (record.status !== task.dataset.status) window.location.reload();
  }
  async function tick() {
    try {
      const response = await fetch("/api/state", { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const state = await response.json();
      for (const el of document.querySelectorAll("[data-field]")) show(el, el.dataset.field, figuresFor(el, state));
      const problems = [state.error, state.metrics_error].filter(Boolean);
      banner.hidden = !problems.length;
      banner.textContent = problems.join(" · ");
      if (state.sampled_at) sampled.textContent = "updated " + new Date(state.sampled_at * 1000).toLocaleTimeString();
      await refreshLetters(state);
      await refreshTask();
    } catch (err) {
      banner.hidden = false;
      banner.textContent = "The console does not answer (" + err.message + "); retrying.";
    } finally {
      window.setTimeout(tick, every);
    }
  }
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
  window.setTimeout(tick, 0);
})();
