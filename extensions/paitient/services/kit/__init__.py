"""What the root-side services share: processes, sockets and pages.

Imported by the services only (root). Nothing here knows a particular service.
"""
