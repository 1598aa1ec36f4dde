//! Public keys that backups are sealed to: age X25519 recipients (`age1…`) and SSH public keys
//! (`ssh-ed25519 …`, `ssh-rsa …`), validated when a policy is parsed.

use serde::{Deserialize, Deserializer};
use std::str::FromStr;

/// A public key that backups are encrypted to: an age X25519 recipient or an SSH public key.
#[derive(Clone)]
pub struct Recipient {
    pub text: String,
}

impl Recipient {
    pub fn to_age(&self) -> Box<dyn age::Recipient + Send + Sync> {
        // Validated at parse time, so both parses below succeed for the matching form.
        if let Ok(r) = age::x25519::Recipient::from_str(&self.text) {
            return Box::new(r);
        }
        Box::new(age::ssh::Recipient::from_str(&self.text).expect("recipient validated at parse time"))
    }
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Recipient {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.starts_with("AGE-SECRET-KEY-") {
            return Err("this is a private identity, not a public recipient: put only `age1…` public keys in policies (the backup host must not be able to decrypt)".into());
        }
        if age::x25519::Recipient::from_str(t).is_ok() || age::ssh::Recipient::from_str(t).is_ok() {
            return Ok(Recipient { text: t.to_string() });
        }
        Err(format!(
            "`{}` is not an age recipient (`age1…`) or an SSH public key; create one with `veza-dr keygen`",
            short(t)
        ))
    }
}

impl<'de> Deserialize<'de> for Recipient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

fn short(s: &str) -> String {
    if s.chars().count() > 24 {
        format!("{}…", s.chars().take(24).collect::<String>())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_private_keys_as_recipients() {
        let id = age::x25519::Identity::generate();
        use age::secrecy::ExposeSecret;
        let err = id.to_string().expose_secret().parse::<Recipient>().unwrap_err();
        assert!(err.contains("private identity"), "{err}");
        assert!(id.to_public().to_string().parse::<Recipient>().is_ok());
    }
}
