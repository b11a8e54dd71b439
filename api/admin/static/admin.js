// Live updates for a job page: poll its JSON endpoint and redraw the status and the
// (server-rendered) loss chart. Pages work without this script; it only saves reloads.
(function () {
  "use strict";
  var live = document.querySelector("[data-live-url]");
  if (!live) {
    return;
  }
  var url = live.getAttribute("data-live-url");
  var every = Math.max(0.5, parseFloat(live.getAttribute("data-poll-seconds") || "2")) * 1000;
  var status = document.getElementById("job-status");
  var chart = document.getElementById("loss-chart");

  function tick() {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 401) {
          window.location.reload();  // the session ended: the page shows the login form
          return null;
        }
        return response.ok ? response.json() : null;
      })
      .then(function (data) {
        if (data) {
          status.textContent = data.status_label;
          status.setAttribute("data-status", data.status);
          status.className = "status status-" + data.status;
          chart.innerHTML = data.svg;
          if (data.terminal) {
            // Final state: reload once so the events and the buttons are current too.
            window.location.reload();
            return;
          }
        }
        window.setTimeout(tick, every);
      })
      .catch(function () {
        window.setTimeout(tick, every);
      });
  }
  window.setTimeout(tick, every);
})();
