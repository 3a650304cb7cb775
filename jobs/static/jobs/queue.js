/* The admin's queue page: load the workers table (asking the workers takes up to a second) after the page.
   Without JavaScript the page links to the same table. */
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var target = document.getElementById("workers");
    if (!target) { return; }
    target.textContent = "Asking the workers…";
    fetch(target.getAttribute("data-url"), { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) { target.innerHTML = html; })
      .catch(function (error) { target.textContent = "The workers could not be asked: " + error.message; });
  });
})();
