"""The control plane of the PACS web portal: accounts, permissions, settings, study tokens, the
activity log and the branded pages, in front of the Orthanc archive."""

__version__ = "0.1.0"
