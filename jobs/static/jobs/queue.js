/* The admin's queue page: the workers table comes with the page, from what the workers last reported. The
   "Ask the workers now" button asks them (up to a second) and puts their answer in place of the table; without
   JavaScript it is a link to the same table on a page of its own. */
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var button = document.getElementById("ask-workers");
    var target = document.getElementById("workers");
    if (!button || !target) { return; }
    button.addEventListener("click", function (event) {
      event.preventDefault();
      button.textContent = "Asking the workers…";
      fetch(button.getAttribute("data-url"), { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) { target.innerHTML = html; button.textContent = "Ask the workers again"; })
        .catch(function (error) { button.textContent = "The workers could not be asked (" + error.message + "): try again"; });
    });
  });
})();
