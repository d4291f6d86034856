//! Who a client certificate is, for the endpoints cloudcore and edgecore
//! both serve: the cluster admin's certificate (issued by cloudcore's
//! cluster CA) is the one identity allowed to read and write through
//! them; a node's certificate from the same CA is not.

use x509_parser::prelude::{FromDer, X509Certificate};

/// Common name of the admin client certificate.
pub const ADMIN_COMMON_NAME: &str = "keel-admin";
/// Organisation of the admin client certificate.
pub const ADMIN_ORGANIZATION: &str = "system:masters";

/// Whether a DER certificate is the cluster admin's (O =
/// [`ADMIN_ORGANIZATION`], CN = [`ADMIN_COMMON_NAME`]). Only the subject
/// is looked at: the TLS layer has already verified the chain.
pub fn is_admin_cert(der: &[u8]) -> bool {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    let subject = cert.subject();
    subject
        .iter_organization()
        .any(|o| o.as_str().is_ok_and(|o| o == ADMIN_ORGANIZATION))
        && single_common_name(subject).is_ok_and(|cn| cn == ADMIN_COMMON_NAME)
}

/// The one common name of `name`; an error if there is none, more than
/// one, or it is not a string.
///
/// # Errors
/// What is wrong with the name, in words.
pub fn single_common_name(
    name: &x509_parser::x509::X509Name<'_>,
) -> std::result::Result<String, String> {
    let mut cns = name.iter_common_name();
    let first = cns.next().ok_or("no common name")?;
    if cns.next().is_some() {
        return Err("more than one common name".into());
    }
    first
        .as_str()
        .map(str::to_owned)
        .map_err(|e| format!("common name is not a string: {e}"))
}
