// The menu button of the narrow layout: shows and hides the main menu. It lives here rather
// than inline because the Content-Security-Policy allows scripts from our own origin only.
(function () {
  "use strict";
  var button = document.querySelector("[data-menu-toggle]");
  var menu = button && document.getElementById(button.getAttribute("aria-controls"));
  if (!button || !menu) {
    return;
  }
  function show(open) {
    button.setAttribute("aria-expanded", open ? "true" : "false");
    menu.classList.toggle("open", open);
  }
  button.addEventListener("click", function () {
    show(button.getAttribute("aria-expanded") !== "true");
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && button.getAttribute("aria-expanded") === "true") {
      show(false);
      button.focus();
    }
  });
})();
