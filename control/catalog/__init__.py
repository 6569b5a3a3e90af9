"""The study catalog: the archive's studies as rows of the control plane's own database.

Orthanc 1.10.1 reads its whole index for a broad search and cannot sort, count cheaply or page
deep. The catalog keeps one row per study with what the query pages search, show and sort, in
tables indexed for each criterion (migration 0004), so that a search costs the same at a million
studies as at a thousand. The archive stays the truth: the catalog is fed from its change log and
can be made again from it at any time.

- ``tables``, ``rows``, ``names``: the rows, how one is read from the archive, and the matching
  form of text (accent-folded, upper-cased).
- ``feeder`` (with ``lock`` and ``store``): one process follows Orthanc's ``/changes`` into the
  rows, builds the catalog and notices deletions, which the log does not report.
- ``freshness``: whether the pages may answer from the catalog now; ``search``: the pages'
  queries; ``qido``: signed-in users' DICOMweb study searches; ``check``: what differs from the
  archive (``./pacs catalog check``).

Access rules are not the catalog's business: it only lists, and every door into a study (zip,
viewer, a patient's link) still asks the archive through the same checks.
"""
