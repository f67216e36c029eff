// Switchboard dashboard: live updates over server-sent events, and small line charts.
// Served by the dashboard itself; no library, no CDN, no build step.
"use strict";
(function () {
  var SERIES = { sessions: 1, users: 2, msg_in: 3, msg_out: 4 };
  var charts = [];

  // Forms with data-confirm ask first (inline handlers are forbidden by the CSP).
  document.addEventListener("submit", function (ev) {
    var text = ev.target.getAttribute && ev.target.getAttribute("data-confirm");
    if (text && !window.confirm(text)) ev.preventDefault();
  });

  // The top of the y axis: four steps of a round size, at least 1 each, a little above v.
  function niceMax(v) {
    var step = Math.max((v * 1.05) / 4, 1);
    var p = Math.pow(10, Math.floor(Math.log10(step)));
    var steps = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * p >= step) return 4 * steps[i] * p;
    }
    return 40 * p;
  }

  function label(v) {
    function trim(x) { return String(Number(x.toFixed(1))); }
    if (v >= 1e6) return trim(v / 1e6) + "M";
    if (v >= 1e3) return trim(v / 1e3) + "k";
    return trim(v);
  }

  function clock(t) {
    var d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

  function Chart(canvas, points) {
    this.canvas = canvas;
    this.points = points;
    this.series = canvas.getAttribute("data-series").split(",");
    this.colors = (canvas.getAttribute("data-colors") || "#2563eb").split(",");
    this.draw();
  }

  Chart.prototype.push = function (point, max) {
    this.points.push([point.t, point.sessions, point.users, point.msg_in, point.msg_out]);
    if (this.points.length > max) this.points.splice(0, this.points.length - max);
    this.draw();
  };

  Chart.prototype.draw = function () {
    var c = this.canvas, dpr = window.devicePixelRatio || 1;
    var w = c.clientWidth, h = c.clientHeight;
    if (!w || !h) return;
    if (c.width !== Math.round(w * dpr)) c.width = Math.round(w * dpr);
    if (c.height !== Math.round(h * dpr)) c.height = Math.round(h * dpr);
    var g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    var left = 44, right = 8, top = 8, bottom = 20;
    var pw = w - left - right, ph = h - top - bottom;
    var pts = this.points, self = this, max = 0;
    pts.forEach(function (p) {
      self.series.forEach(function (s) { max = Math.max(max, p[SERIES[s]] || 0); });
    });
    var ymax = niceMax(max);
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#6b7280";
    g.strokeStyle = "#e5e7eb";
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (var i = 0; i <= 4; i++) {
      var y = top + ph - (ph * i) / 4;
      g.beginPath(); g.moveTo(left, Math.round(y) + 0.5); g.lineTo(left + pw, Math.round(y) + 0.5); g.stroke();
      g.fillText(label((ymax * i) / 4), left - 6, y);
    }
    if (pts.length < 2) {
      g.textAlign = "center";
      g.fillText("collecting samples…", left + pw / 2, top + ph / 2);
      return;
    }
    var t0 = pts[0][0], t1 = pts[pts.length - 1][0], span = Math.max(1, t1 - t0);
    g.textBaseline = "top";
    g.textAlign = "left"; g.fillText(clock(t0), left, top + ph + 5);
    g.textAlign = "right"; g.fillText(clock(t1), left + pw, top + ph + 5);
    this.series.forEach(function (s, k) {
      var idx = SERIES[s];
      g.strokeStyle = self.colors[k % self.colors.length];
      g.lineWidth = 2;
      g.lineJoin = "round";
      g.beginPath();
      pts.forEach(function (p, j) {
        var x = left + (pw * (p[0] - t0)) / span;
        var yy = top + ph - (ph * (p[idx] || 0)) / ymax;
        if (j === 0) g.moveTo(x, yy); else g.lineTo(x, yy);
      });
      g.stroke();
    });
  };

  function initCharts() {
    var holder = document.getElementById("history");
    var history = holder ? JSON.parse(holder.textContent) : [];
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      charts.push(new Chart(canvas, history.slice()));
    });
    window.addEventListener("resize", function () { charts.forEach(function (ch) { ch.draw(); }); });
  }

  function apply(fields) {
    document.querySelectorAll("[data-field]").forEach(function (el) {
      var v = fields[el.getAttribute("data-field")];
      if (v === undefined || el.textContent === v) return;
      el.textContent = v;
      if (el.hasAttribute("data-value")) el.setAttribute("data-value", v);
    });
  }

  // Drain is offered to a serving worker, undrain to a draining one.
  function updateButtons() {
    document.querySelectorAll("tr[data-worker]").forEach(function (row) {
      var state = row.querySelector('[data-field$=".state"]');
      if (!state) return;
      var drain = row.querySelector("button[name=drain]");
      var undrain = row.querySelector("button[name=undrain]");
      if (drain) drain.disabled = state.textContent !== "serving";
      if (undrain) undrain.disabled = state.textContent !== "draining";
    });
  }

  function setStatus(state) {
    var el = document.getElementById("live-status");
    if (el) el.setAttribute("data-state", state);
  }

  function connect(url) {
    var source = new EventSource(url);
    var maxPoints = 600;
    source.addEventListener("snapshot", function (ev) {
      var data = JSON.parse(ev.data);
      setStatus("live");
      apply(data.fields);
      updateButtons();
      charts.forEach(function (ch) { ch.push(data.point, maxPoints); });
      document.body.setAttribute("data-live-updates", String(Number(document.body.getAttribute("data-live-updates") || 0) + 1));
    });
    source.addEventListener("expired", function () {
      source.close();
      window.location.href = "/login?expired=1&next=" + encodeURIComponent(location.pathname + location.search);
    });
    source.onerror = function () {
      setStatus("lost");
      // A closed stream (e.g. 401 after the session ended): reload, which leads to the login page.
      if (source.readyState === EventSource.CLOSED) setTimeout(function () { location.reload(); }, 3000);
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    initCharts();
    var url = document.body.getAttribute("data-live");
    if (url && window.EventSource) connect(url);
  });
})();
