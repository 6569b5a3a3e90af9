"""Query and retrieve: the search form, the patient/study/series lists, zip downloads and the downloader.

For signed-in users (physicians and admins). ``views`` holds the pages, ``criteria`` the form and
its translation into an Orthanc query, ``finder`` the newest-first paging over Orthanc's
``/tools/find``, ``present`` the rows as pages and JSON show them, ``downloads`` the zips and the
downloader's manifest and command line (the program itself, one file or a package for
pip, is public: ``control.public``), and
``links`` the patients' study links users copy from the results.
"""

from flask import Blueprint

bp = Blueprint("query", __name__)

from control.query import downloads, links, views  # noqa: E402, F401 - the modules register bp's routes
