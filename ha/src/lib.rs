//! High availability: failure detection, leases, fencing, roles.
