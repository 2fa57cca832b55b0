"""ebsrole: build role AMIs whose dynamic data lives on an EBS volume."""

__version__ = "0.1.0"
