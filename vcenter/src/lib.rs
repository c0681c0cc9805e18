//! A standalone vSphere SOAP (vim25) client: VMs, datastore upload, CD-ROM, boot order,
//! power and snapshots. It knows nothing about failback.
