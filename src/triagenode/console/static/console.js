// The worklist's auto-refresh: reload every N seconds while the box is ticked, the tab is
// visible and nobody is typing in a field. Nothing else in the console needs script.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!seconds) { return; }
  window.setInterval(function () {
    var box = document.getElementById("auto-refresh");
    var active = document.activeElement;
    var typing = active && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName) && active.type !== "checkbox";
    if (box && box.checked && !document.hidden && !typing) { window.location.reload(); }
  }, seconds * 1000);
})();
