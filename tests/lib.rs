//! End-to-end tests of cellchat live in this package's test targets (`cluster.rs`, ...); they
//! start real `server` processes through `testkit`. This library is empty on purpose.
