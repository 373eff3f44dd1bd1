// The console's only script: confirmations for actions, and charts drawn from the data the server
// put in a data attribute (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  var palette = ["#2f6fd6", "#d6822f", "#2fa36b", "#a33f9c", "#c9452f", "#5a6f80", "#8a7d1f", "#1f8a8a"];

  function bars(canvas, labels, values, unit) {
    var existing = window.Chart.getChart(canvas);
    if (existing) {
      existing.destroy();
    }
    canvas.parentElement.style.height = Math.max(80, 26 * labels.length + 30) + "px";
    return new window.Chart(canvas, {
      type: "bar",
      data: {
        labels: labels,
        datasets: [{ data: values, backgroundColor: labels.map(function (_, i) { return palette[i % palette.length]; }) }],
      },
      options: {
        indexAxis: "y",
        animation: false,
        maintainAspectRatio: false,
        plugins: { legend: { display: false }, tooltip: { callbacks: { label: function (c) { return c.raw + " " + unit; } } } },
        scales: { x: { beginAtZero: true, title: { display: true, text: unit } } },
      },
    });
  }

  function draw(root) {
    if (!window.Chart) {
      return;
    }
    var holder = root.querySelector(".chart-data");
    if (!holder) {
      return;
    }
    var data = JSON.parse(holder.getAttribute("data-json"));
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var kind = canvas.getAttribute("data-chart");
      var stage = canvas.getAttribute("data-stage");
      var series = kind === "phases" ? data.phases : kind === "stage" ? data.stage_phases[stage] : null;
      if (series) {
        bars(canvas, Object.keys(series), Object.values(series), "s");
      } else if (kind === "acceptance" && data.acceptance[stage]) {
        var rates = data.acceptance[stage];
        bars(canvas, rates.map(function (_, i) { return "draft " + (i + 1); }), rates, "accepted");
      }
    });
  }

  function tail(root) {
    // A log tail is read from its end: keep the newest line in view.
    root.querySelectorAll("pre.log").forEach(function (pre) { pre.scrollTop = pre.scrollHeight; });
  }

  window.addEventListener("load", function () { draw(document); tail(document); });
  document.addEventListener("htmx:afterSettle", function () { draw(document); tail(document); });
})();
