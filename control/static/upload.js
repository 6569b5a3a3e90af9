// The upload page: files from the picker or dropped on the page are sent in batches, one request
// each, with a progress bar per batch and the server's result for every file (and every zip member
// and HL7 message) in a table under it. Without this script the form posts normally and the page
// comes back with the same table. No inline code: the page's content security policy forbids it.
(function () {
  "use strict";

  var form = document.getElementById("upload-form");
  if (!form) {
    return;
  }
  var input = document.getElementById("upload-files");
  var zone = document.getElementById("drop-zone");
  var batches = document.getElementById("upload-batches");
  var maxBytes = Number(form.dataset.maxBytes);
  var token = form.querySelector("input[name=csrf_token]").value;
  var BATCH_FILES = 50;
  var BATCH_BYTES = Math.min(maxBytes, 64 * 1024 * 1024);
  var OUTCOMES = {
    stored: "stored",
    duplicate: "already in the archive",
    refused: "refused",
    skipped: "skipped",
    scheduled: "scheduled",
    replaced: "replaced",
    cancelled: "cancelled"
  };
  var queue = [];
  var sending = false;
  // Files go as soon as they are chosen or dropped: the form's own button is for browsers without this script.
  document.getElementById("upload-submit").hidden = true;
  var count = 0;

  function megabytes(bytes) {
    if (bytes < 1024 * 1024) {
      return Math.ceil(bytes / 1024) + " kB";
    }
    return (bytes / 1024 / 1024).toFixed(1) + " MB";
  }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function row(table, name, outcome, detail) {
    var tr = element("tr", "upload-" + outcome);
    tr.appendChild(element("td", "", name));
    tr.appendChild(element("td", "", OUTCOMES[outcome] || outcome));
    tr.appendChild(element("td", "", detail || ""));
    table.tBodies[0].appendChild(tr);
  }

  function batchBlock(files) {
    count += 1;
    var size = files.reduce(function (total, file) { return total + file.size; }, 0);
    var block = element("div", "upload-batch");
    var title = files.length === 1 ? files[0].name : files.length + " files";
    block.appendChild(element("h3", "", "Upload " + count + ": " + title + " (" + megabytes(size) + ")"));
    var progress = element("progress");
    progress.max = 100;
    progress.value = 0;
    block.appendChild(progress);
    var status = element("p", "upload-status", "Waiting…");
    block.appendChild(status);
    var table = element("table", "grid upload-results");
    var head = element("thead");
    var headRow = element("tr");
    ["File", "Result", "Details"].forEach(function (label) { headRow.appendChild(element("th", "", label)); });
    head.appendChild(headRow);
    table.appendChild(head);
    table.appendChild(element("tbody"));
    block.appendChild(table);
    batches.appendChild(block);
    return { files: files, progress: progress, status: status, table: table };
  }

  function refuseAll(batch, message) {
    batch.status.textContent = message;
    batch.status.className = "upload-status flash error";
    batch.files.forEach(function (file) { row(batch.table, file.name, "refused", message); });
  }

  function finished(batch, xhr) {
    batch.progress.value = 100;
    var answer = null;
    try {
      answer = JSON.parse(xhr.responseText);
    } catch (error) {
      answer = null;
    }
    if (xhr.status === 200 && answer && answer.results) {
      answer.results.forEach(function (result) {
        row(batch.table, result.name, result.outcome, result.detail || result.patient);
      });
      var parts = [];
      Object.keys(answer.counts).forEach(function (name) {
        if (answer.counts[name]) {
          parts.push(answer.counts[name] + " " + (OUTCOMES[name] || name));
        }
      });
      batch.status.textContent = "Done: " + parts.join(" · ");
      return;
    }
    if (xhr.status === 413) {
      refuseAll(batch, "Too large: this server accepts at most " + megabytes(maxBytes) + " per upload.");
    } else if (answer && answer.message) {
      refuseAll(batch, answer.message);
    } else if (xhr.status === 0) {
      refuseAll(batch, "The connection was lost; nothing is known about these files. Please try again.");
    } else {
      refuseAll(batch, "The server answered " + xhr.status + "; please try again.");
    }
  }

  function sendNext() {
    if (sending || !queue.length) {
      return;
    }
    sending = true;
    var batch = queue.shift();
    var data = new FormData();
    data.append("csrf_token", token);
    batch.files.forEach(function (file) { data.append("files", file, file.name); });
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRFToken", token);
    xhr.upload.addEventListener("progress", function (event) {
      if (event.lengthComputable) {
        batch.progress.value = Math.round((event.loaded / event.total) * 95);
        batch.status.textContent = "Sending… " + megabytes(event.loaded) + " of " + megabytes(event.total);
      }
    });
    xhr.upload.addEventListener("load", function () {
      batch.status.textContent = "Checking and storing…";
    });
    xhr.addEventListener("loadend", function () {
      finished(batch, xhr);
      sending = false;
      sendNext();
    });
    batch.status.textContent = "Sending…";
    xhr.send(data);
  }

  function enqueue(fileList) {
    var files = Array.prototype.slice.call(fileList);
    var current = [];
    var currentBytes = 0;
    function close() {
      if (current.length) {
        queue.push(batchBlock(current));
        current = [];
        currentBytes = 0;
      }
    }
    files.forEach(function (file) {
      if (file.size > maxBytes) {
        var alone = batchBlock([file]);
        refuseAll(alone, "Too large: this server accepts at most " + megabytes(maxBytes) + " per upload.");
        return;
      }
      if (current.length >= BATCH_FILES || currentBytes + file.size > BATCH_BYTES) {
        close();
      }
      current.push(file);
      currentBytes += file.size;
    });
    close();
    sendNext();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (input.files.length) {
      enqueue(input.files);
      input.value = "";
    }
  });
  input.addEventListener("change", function () {
    if (input.files.length) {
      enqueue(input.files);
      input.value = "";
    }
  });
  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (event) {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function () { zone.classList.remove("dragging"); });
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      enqueue(event.dataTransfer.files);
    }
  });
}());
