//! keel's criterion benches live in `benches/`; this library is empty.
