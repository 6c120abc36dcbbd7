// compensa console: refresh the live counts on their own, and tick every box of a page.
// Plain JS, no build step, no dependency; the pages work without it.
(function () {
  "use strict";
  var REFRESH_MS = 5000;

  function refresh(box) {
    fetch(box.getAttribute("data-url"), { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (counts) {
        if (!counts) { return; }
        Object.keys(counts).forEach(function (name) {
          var cell = document.getElementById("live-" + name);
          if (cell) {
            cell.textContent = String(counts[name]);
            cell.parentElement.classList.toggle("warn", counts[name] > 0 && name !== "running" && name !== "compensation_failed");
            if (name === "compensation_failed") { cell.parentElement.classList.toggle("bad", counts[name] > 0); }
          }
        });
        box.setAttribute("data-refreshed", new Date().toISOString());
      })
      .catch(function () { /* the next tick tries again */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("live");
    if (box) { window.setInterval(function () { refresh(box); }, REFRESH_MS); }
    var all = document.getElementById("select-all");
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll("input.pick:not([disabled])").forEach(function (pick) { pick.checked = all.checked; });
      });
    }
  });
})();
