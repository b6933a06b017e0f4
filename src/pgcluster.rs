//! STUB
#[derive(Debug, thiserror::Error)] pub enum PgClusterError { #[error("x")] X }
#[derive(Default)] pub struct ClusterOptions { pub shared_preload_libraries: Vec<String> }
pub struct PgCluster;
impl PgCluster {
 pub fn start(_o: ClusterOptions) -> Result<PgCluster, PgClusterError> { Err(PgClusterError::X) }
 pub fn port(&self) -> u16 { 0 }
 pub fn base_dir(&self) -> &std::path::Path { std::path::Path::new("/") }
 pub fn connection_string(&self, _d: &str) -> String { String::new() }
 pub fn pg_stat_statements_available(&self) -> bool { true }
 pub fn stop(&mut self) -> Result<(), PgClusterError> { Ok(()) }
 pub fn start_again(&mut self) -> Result<(), PgClusterError> { Ok(()) }
 pub fn restart(&mut self) -> Result<(), PgClusterError> { Ok(()) }
 pub fn pause(&self) -> Result<(), PgClusterError> { Ok(()) }
 pub fn resume(&self) -> Result<(), PgClusterError> { Ok(()) }
 pub fn create_database(&self, _n: &str) -> Result<(), PgClusterError> { Ok(()) }
 pub fn psql(&self, _d: &str, _s: &str) -> Result<String, PgClusterError> { Ok(String::new()) }
 pub fn psql_file(&self, _d: &str, _p: &std::path::Path) -> Result<String, PgClusterError> { Ok(String::new()) }
}
