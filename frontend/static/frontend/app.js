/* The dashboard's only script: live updates by polling server-rendered fragments, and small form helpers.
   Every page works without it (the form posts normally; the pages show the state when loaded). */
(function () {
  "use strict";

  var ACTIVE_MS = 2000;   // while jobs run
  var IDLE_MS = 15000;
  var STATUSES = readJson("job-statuses") || { active: [], terminal: [], icons: {} };  // rendered from jobs.models.Job

  function readJson(id) {
    var element = document.getElementById(id);
    try { return element ? JSON.parse(element.textContent) : null; } catch (e) { return null; }
  }

  function liveRoot(container) {
    return container.querySelector(".live-root");
  }

  function scrollLogs(scope) {
    scope.querySelectorAll("pre.log").forEach(function (pre) { pre.scrollTop = pre.scrollHeight; });
  }

  function startLive(container) {
    var url = container.getAttribute("data-live-url");
    var reloadWhenDone = container.getAttribute("data-reload-when-done") === "true";
    var isJobPage = container.hasAttribute("data-reload-when-done");
    var failures = 0;

    function schedule() {
      var root = liveRoot(container);
      var active = root && root.getAttribute("data-active") === "true";
      if (!active && isJobPage) { return; }  // a finished job does not change any more
      window.setTimeout(poll, active ? ACTIVE_MS : IDLE_MS);
    }

    function poll() {
      if (document.hidden) { window.setTimeout(poll, ACTIVE_MS); return; }
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (response) {
          if (response.redirected || !response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) {
          failures = 0;
          var log = container.querySelector("pre.log");
          var atBottom = !log || log.scrollTop + log.clientHeight >= log.scrollHeight - 20;
          container.innerHTML = html;
          if (atBottom) { scrollLogs(container); }
          var root = liveRoot(container);
          var badge = document.getElementById("job-status");
          if (badge && root && root.getAttribute("data-status")) {
            var status = root.getAttribute("data-status");
            // Only on a change: the badge is a live region, so each write is read out
            if (badge.className !== "badge badge-" + status) {
              // "Job 12 is queued." is no longer true: drop the flash that said so
              document.querySelectorAll(".message.job-state").forEach(function (m) { m.remove(); });
              badge.className = "badge badge-" + status;
              badge.firstChild.textContent = STATUSES.icons[status] || "•";
              badge.lastChild.textContent = " " + root.getAttribute("data-status-label");
            }
          }
          if (reloadWhenDone && root && root.getAttribute("data-active") !== "true") {
            window.location.reload();  // the job ended: the full page shows its results or its failure
            return;
          }
          schedule();
        })
        .catch(function () {
          failures += 1;
          window.setTimeout(poll, Math.min(30000, ACTIVE_MS * Math.pow(2, failures)));
        });
    }

    scrollLogs(container);
    schedule();
  }

  /* --- the new-job form --------------------------------------------------------------------------- */

  function checkedValue(form, name) {
    var input = form.querySelector('input[name="' + name + '"]:checked');
    return input ? input.value : "";
  }

  function togglePanels(form) {
    var source = checkedValue(form, "model_source");
    form.querySelectorAll(".source-panel").forEach(function (panel) {
      panel.hidden = panel.getAttribute("data-source") !== source;
    });
    var kind = checkedValue(form, "calibration_kind");
    form.querySelectorAll(".calib-panel").forEach(function (panel) {
      panel.hidden = panel.getAttribute("data-kind").split(" ").indexOf(kind) < 0;
    });
    var recipe = form.querySelector(".recipe-panel");
    if (recipe) {
      // Shown for a custom recipe, or when it holds text or an error (never hide what needs attention).
      var textarea = recipe.querySelector("textarea");
      recipe.hidden = checkedValue(form, "preset") !== "custom" && !(textarea && textarea.value.trim()) &&
        !recipe.querySelector(".has-error");
    }
  }

  function previewJsonl(input) {
    var target = document.getElementById("jsonl-preview");
    if (!target || !input.files || !input.files[0]) { return; }
    var file = input.files[0];
    var reader = new FileReader();
    reader.onload = function () {
      var lines = String(reader.result).split(/\r?\n/).filter(function (l) { return l.trim(); }).slice(0, 5);
      var problems = 0;
      lines.forEach(function (line) {
        try {
          var row = JSON.parse(line);
          if (typeof row.text !== "string" && !Array.isArray(row.messages)) { problems += 1; }
        } catch (e) { problems += 1; }
      });
      target.textContent = "";
      var title = document.createElement("p");
      title.className = "small";
      title.innerHTML = "<strong></strong>";
      title.firstChild.textContent = "First rows of " + file.name + ":";
      var pre = document.createElement("pre");
      pre.textContent = lines.map(function (l) { return l.length > 300 ? l.slice(0, 300) + "…" : l; }).join("\n");
      target.appendChild(title);
      target.appendChild(pre);
      if (problems) {
        var warn = document.createElement("p");
        warn.className = "field-error";
        warn.textContent = problems + " of these rows have neither a \"text\" string nor a \"messages\" list.";
        target.appendChild(warn);
      }
    };
    reader.readAsText(file.slice(0, 64 * 1024));
  }

  function setupForm(form) {
    form.addEventListener("change", function (event) {
      togglePanels(form);
      if (event.target.name === "calibration_upload") { previewJsonl(event.target); }
    });
    togglePanels(form);
    var summary = document.getElementById("error-summary");
    if (summary) { summary.focus(); }
  }

  /* --- actions that ask first (cancel): a dialog here; without the script the server asks on a page --- */

  function setupConfirm(form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); return; }
      var confirmed = document.createElement("input");
      confirmed.type = "hidden";
      confirmed.name = "confirm";
      confirmed.value = "yes";
      form.appendChild(confirmed);
    });
  }

  /* --- copy buttons: hidden in the HTML (without the script they could not copy), shown here --- */

  function setupCopy(button) {
    var target = document.querySelector(button.getAttribute("data-copy"));
    if (!target || !navigator.clipboard) { return; }
    button.hidden = false;
    button.addEventListener("click", function () {
      navigator.clipboard.writeText(target.textContent.trim()).then(function () { button.textContent = "Copied"; });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("button[data-copy]").forEach(setupCopy);
    document.querySelectorAll("form[data-confirm]").forEach(setupConfirm);
    document.querySelectorAll("[data-live-url]").forEach(startLive);
    document.querySelectorAll("form.job-form").forEach(setupForm);
  });
})();
