// The dashboard redraws itself from dashboard.json every 10 s: numbers, links, the node table
// and the hourly charts. No framework; every text goes in through textContent.
(() => {
  const EVERY_MS = 10000;
  const SVG = "http://www.w3.org/2000/svg";
  const root = document.getElementById("dashboard");
  if (!root) return;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  }

  function badge(cls, text) { return el("span", { class: "badge " + cls }, text); }

  function link(href, text, cls) {
    const a = el("a", { href: href }, text);
    if (cls) a.className = cls;
    return a;
  }

  function nodeRow(n) {
    const tr = el("tr");
    const name = el("td");
    name.append(link(n.url, n.name), el("br"), el("small", { class: "muted mono" }, n.address));
    const state = el("td");
    state.append(n.enabled ? badge("ok", "Enabled") : badge("off", "Disabled"));
    const echo = el("td");
    if (n.echo_state === "failed") {
      echo.append(badge("bad", "Failed"), " " + n.last_echo + " ",
                  el("span", { class: "error" }, n.last_echo_error));
      if (n.last_echo_ok) echo.append(el("br"), el("small", { class: "muted" }, "last OK " + n.last_echo_ok));
    } else if (n.echo_state === "ok") {
      echo.append(badge("ok", "OK"), " " + n.last_echo);
    } else {
      echo.append(el("span", { class: "muted" }, "never checked"));
    }
    const delivered = el("td");
    delivered.append(n.last_delivered ? link(n.delivered_url, n.last_delivered)
                                      : el("span", { class: "muted" }, "never"));
    const backlog = el("td", { class: "num" });
    backlog.append(link(n.backlog_url, String(n.backlog)));
    const dead = el("td", { class: "num" });
    dead.append(link(n.dead_url, String(n.dead), n.dead ? "error" : ""));
    tr.append(name, state, echo, delivered, backlog, dead);
    return tr;
  }

  function drawNodes(nodes) {
    const body = document.querySelector("#node-health tbody");
    if (!body) return;
    const rows = nodes.map(nodeRow);
    if (!rows.length) {
      const tr = el("tr");
      tr.append(el("td", { colspan: "6", class: "muted" }, "No nodes yet."));
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  // Places what gateway.views.dashboard.charts computed: x and width in %, y and height in px.
  function drawChart(chart) {
    const box = document.querySelector(`svg[data-chart="${chart.id}"]`);
    if (!box) return;
    const parts = [svg("line", { x1: "0", x2: "100%", y1: chart.baseline, y2: chart.baseline })];
    for (const bar of chart.bars) {
      const rect = svg("rect", { class: "s" + bar.series, x: bar.x + "%", y: bar.y,
                                 width: bar.width + "%", height: bar.height });
      const title = svg("title", {});
      title.textContent = bar.title;
      rect.append(title);
      parts.push(rect);
    }
    for (const tick of chart.ticks) {
      const text = svg("text", { x: tick.x + "%", y: tick.y, "text-anchor": tick.anchor });
      text.textContent = tick.label;
      parts.push(text);
    }
    box.replaceChildren(...parts);
    const label = document.querySelector(`[data-peak="${chart.id}"]`);
    if (label) label.textContent = String(chart.peak);
  }

  function draw(data) {
    for (const [key, value] of Object.entries(data.counts)) {
      for (const node of root.querySelectorAll(`[data-count="${key}"]`)) node.textContent = value;
      const card = root.querySelector(`[data-alert="${key}"]`);
      if (card) card.classList.toggle("alert", value > 0);
    }
    for (const [key, href] of Object.entries(data.links)) {
      for (const node of root.querySelectorAll(`[data-link="${key}"]`)) node.setAttribute("href", href);
    }
    for (const field of ["since_display", "generated"]) {
      const node = root.querySelector(`[data-field="${field}"]`);
      if (node) node.textContent = data[field];
    }
    drawNodes(data.nodes);
    for (const chart of data.charts) drawChart(chart);
    status.classList.remove("error");
  }

  const status = document.getElementById("dashboard-status");
  let stale = false;

  async function refresh() {
    if (document.hidden) return;
    try {
      const response = await fetch(root.dataset.url, {
        headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store",
      });
      const type = response.headers.get("Content-Type") || "";
      if (!response.ok || !type.includes("application/json")) throw new Error(response.status);
      draw(await response.json());
      stale = false;
    } catch (error) {
      // Signed out, server restarting, network gone: say so, keep the last numbers.
      if (!stale) status.append(el("span", { class: "error", "data-stale": "" }, " · not updating, the server did not answer"));
      stale = true;
      status.classList.add("error");
      return;
    }
    for (const note of status.querySelectorAll("[data-stale]")) note.remove();
  }

  setInterval(refresh, EVERY_MS);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
})();
