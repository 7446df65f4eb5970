//! The WebAuthn ceremonies, as functions over `webauthn_rp`'s types and
//! bytes: no database, no HTTP. The routes store what these return (a
//! ceremony's server half, found again by its challenge; a credential's
//! public key and counters) and hand it back.
//!
//! `webauthn_rp` (MIT or Apache-2.0) does the verification: client data,
//! origin, RP id hash, flags, the attestation (`none` is all Plinth asks
//! for), the signature and the counter. It is pure Rust on the RustCrypto
//! curves the build already has for OpenID Connect; `webauthn-rs` would
//! have brought OpenSSL and an MPL licence.

use std::time::SystemTime;

use webauthn_rp::bin::{Decode, Encode};
use webauthn_rp::request::auth::{AllowedCredentials, AuthenticationVerificationOptions};
use webauthn_rp::request::register::{
    CredProtect, PublicKeyCredentialUserEntity, RegistrationVerificationOptions, UserHandle64, Username,
};
use webauthn_rp::request::{
    AsciiDomain, Credentials as _, DomainOrigin, ExtensionInfo, PublicKeyCredentialDescriptor, RpId, Scheme,
    TimedCeremony,
};
use webauthn_rp::response::register::{CompressedPubKey, DynamicState, StaticState};
use webauthn_rp::response::{AuthTransports, CredentialId, Origin};
use webauthn_rp::{
    AuthenticatedCredential, DiscoverableAuthentication64, DiscoverableAuthenticationServerState,
    DiscoverableCredentialRequestOptions, NonDiscoverableAuthentication64, NonDiscoverableAuthenticationServerState,
    NonDiscoverableCredentialRequestOptions, PublicKeyCredentialCreationOptions, Registration, RegistrationServerState,
};

/// Why a ceremony step did not go through.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// What the browser sent is not a WebAuthn response of the right kind.
    #[error("not a passkey response of this kind: {0}")]
    Malformed(String),
    /// The response is well formed but fails verification (origin,
    /// signature, flags, expiry, another credential, another user).
    #[error("the passkey was refused: {0}")]
    Failed(String),
    /// Something Plinth stored cannot be read back, or a request could not
    /// be built: a fault of Plinth's, not of the caller's.
    #[error("passkey state: {0}")]
    Internal(String),
}

fn malformed(err: impl std::fmt::Display) -> Refused {
    Refused::Malformed(err.to_string())
}
fn failed(err: impl std::fmt::Display) -> Refused {
    Refused::Failed(err.to_string())
}
fn internal(err: impl std::fmt::Display) -> Refused {
    Refused::Internal(err.to_string())
}

/// Where passkeys belong: the relying party id (`PLINTH_BASE_DOMAIN`), and
/// the origins whose pages may use them: `https://` that domain or any
/// name under it (the tenants' subdomains), on any port. Plain `http://`
/// only when the domain is `localhost`, which browsers treat as secure.
#[derive(Debug)]
pub struct Site {
    rp_id: RpId,
    origins: [SiteOrigin; 1],
}

impl Site {
    pub fn new(domain: &str) -> Result<Self, Refused> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let label =
            |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !domain.split('.').all(label) {
            return Err(Refused::Internal(format!("{domain:?} is not a domain name")));
        }
        let rp_id = RpId::Domain(AsciiDomain::try_from(domain.clone()).map_err(internal)?);
        let http = domain == "localhost";
        Ok(Self { rp_id, origins: [SiteOrigin { domain, http }] })
    }

    fn registration_options(&self) -> RegistrationVerificationOptions<'_, '_, SiteOrigin, SiteOrigin> {
        RegistrationVerificationOptions { allowed_origins: &self.origins, ..Default::default() }
    }

    fn authentication_options(&self) -> AuthenticationVerificationOptions<'_, '_, SiteOrigin, SiteOrigin> {
        AuthenticationVerificationOptions {
            allowed_origins: &self.origins,
            // Keep whether the passkey has verified its user.
            update_uv: true,
            // The counter's default: once a passkey's counter has started,
            // one that does not grow is a cloned authenticator and refused
            // (synced passkeys keep theirs at zero, never refused).
            ..Default::default()
        }
    }
}

/// The origins a site's pages have (see [`Site`]).
#[derive(Debug)]
struct SiteOrigin {
    domain: String,
    http: bool,
}

impl PartialEq<Origin<'_>> for SiteOrigin {
    fn eq(&self, other: &Origin<'_>) -> bool {
        DomainOrigin::try_from(other.0.as_ref()).is_ok_and(|origin| {
            let host = origin.host.to_ascii_lowercase();
            let under = host == self.domain
                || host.strip_suffix(self.domain.as_str()).is_some_and(|label| label.len() > 1 && label.ends_with('.'));
            let scheme = match origin.scheme {
                Scheme::Https => true,
                Scheme::Other("http") => self.http,
                _ => false,
            };
            under && scheme
        })
    }
}

/// A ceremony begun: what is stored (the challenge it is found by, the
/// server's half, when it expires) and what goes to the browser.
pub struct Started {
    pub challenge: [u8; 16],
    pub state: Vec<u8>,
    pub expires_at: SystemTime,
    /// `PublicKeyCredentialCreationOptionsJSON` or
    /// `PublicKeyCredentialRequestOptionsJSON`: what
    /// `PublicKeyCredential.parseCreationOptionsFromJSON` (or
    /// `parseRequestOptionsFromJSON`) takes.
    pub options: serde_json::Value,
}

/// A passkey as stored.
pub struct Stored {
    pub credential_id: Vec<u8>,
    pub static_state: Vec<u8>,
    pub dynamic_state: Vec<u8>,
    pub transports: i32,
}

/// A passkey just registered, to store.
#[derive(Debug)]
pub struct NewPasskey {
    pub credential_id: Vec<u8>,
    pub static_state: Vec<u8>,
    pub dynamic_state: [u8; 7],
    pub transports: i32,
}

fn challenge_bytes(challenge: webauthn_rp::response::SentChallenge) -> [u8; 16] {
    challenge.0.to_le_bytes()
}

/// A ceremony begun: its server half encoded to store, its client half as
/// JSON for the browser.
fn started<S, C>(server: S, client: &C) -> Result<Started, Refused>
where
    S: TimedCeremony + for<'a> Encode<Output<'a> = Vec<u8>>,
    S::Err: std::fmt::Display,
    C: serde::Serialize,
{
    Ok(Started {
        challenge: challenge_bytes(server.sent_challenge()),
        expires_at: server.expiration(),
        state: server.encode().map_err(internal)?,
        options: serde_json::to_value(client).map_err(internal)?,
    })
}

fn descriptor(credential_id: &[u8], transports: i32) -> Result<PublicKeyCredentialDescriptor<Vec<u8>>, Refused> {
    let id = CredentialId::<Vec<u8>>::decode(credential_id.to_vec()).map_err(internal)?;
    let transports = AuthTransports::decode(u8::try_from(transports).map_err(internal)?).map_err(internal)?;
    Ok(PublicKeyCredentialDescriptor { id, transports })
}

/// A new user handle: 64 random bytes.
pub fn new_user_handle() -> [u8; 64] {
    let handle = UserHandle64::new();
    match handle.encode() {
        Ok(bytes) => bytes,
        Err(never) => match never {},
    }
}

fn user_handle(bytes: &[u8]) -> Result<UserHandle64, Refused> {
    let bytes: [u8; 64] = bytes.try_into().map_err(|_| internal("a user handle is not 64 bytes"))?;
    UserHandle64::decode(bytes).map_err(internal)
}

/// Begins registering a passkey for the account with `handle`, named
/// `email` on the authenticator; `existing` (credential ids and
/// transports) are excluded, so one authenticator does not hold two.
pub fn start_registration(
    site: &Site,
    handle: &[u8],
    email: &str,
    existing: &[(Vec<u8>, i32)],
) -> Result<Started, Refused> {
    let handle = user_handle(handle)?;
    let name = Username::try_from(email).or_else(|_| Username::try_from("plinth")).map_err(internal)?;
    let exclude = existing.iter().map(|(id, transports)| descriptor(id, *transports)).collect::<Result<Vec<_>, _>>()?;
    let user = PublicKeyCredentialUserEntity { name, id: &handle, display_name: None };
    let mut options = PublicKeyCredentialCreationOptions::passkey(&site.rp_id, user, exclude);
    // Asked for, not enforced: an authenticator without credProtect (many
    // platform ones) would otherwise refuse to make the passkey. Signing in
    // asks for user verification and checks it anyway.
    options.extensions.cred_protect = CredProtect::UserVerificationRequired(ExtensionInfo::AllowDontEnforceValue);
    let (server, client) = options.start_ceremony().map_err(internal)?;
    started(server, &client)
}

/// A registration response (`RegistrationResponseJSON`, what
/// `PublicKeyCredential.toJSON()` gives after `navigator.credentials.create`).
pub struct NewCredential(Registration);

impl NewCredential {
    pub fn parse(json: &[u8]) -> Result<Self, Refused> {
        Registration::from_json_relaxed(json).map(Self).map_err(malformed)
    }

    /// The challenge it answers: which ceremony to finish.
    pub fn challenge(&self) -> Result<[u8; 16], Refused> {
        self.0.challenge_relaxed().map(challenge_bytes).map_err(malformed)
    }

    /// Verifies it against the ceremony's stored half.
    pub fn verify(&self, site: &Site, state: &[u8]) -> Result<NewPasskey, Refused> {
        let server = RegistrationServerState::<64>::decode(state).map_err(internal)?;
        let registered = server.verify(&site.rp_id, &self.0, &site.registration_options()).map_err(failed)?;
        let static_state = registered.static_state().encode().map_err(internal)?;
        let dynamic_state = registered.dynamic_state().encode().map_err(internal)?;
        let transports = registered.transports().encode().map_err(internal)?;
        Ok(NewPasskey {
            credential_id: registered.id().encode().map_err(internal)?.to_vec(),
            static_state,
            dynamic_state,
            transports: i32::from(transports),
        })
    }
}

/// Begins signing in with a passkey alone: any passkey of the site the
/// authenticator holds, with user verification (a PIN or biometric), so
/// the passkey is two factors on its own.
pub fn start_sign_in(site: &Site) -> Result<Started, Refused> {
    let (server, client) =
        DiscoverableCredentialRequestOptions::passkey(&site.rp_id).start_ceremony().map_err(internal)?;
    started(server, &client)
}

/// Begins a passkey as the second factor, after the password: one of
/// `passkeys` (credential ids and transports), user presence enough.
pub fn start_second_factor(site: &Site, passkeys: &[(Vec<u8>, i32)]) -> Result<Started, Refused> {
    let mut allowed = AllowedCredentials::with_capacity(passkeys.len());
    for (id, transports) in passkeys {
        allowed.push(descriptor(id, *transports)?.into());
    }
    let (server, client) = NonDiscoverableCredentialRequestOptions::second_factor(&site.rp_id, allowed)
        .map_err(internal)?
        .start_ceremony()
        .map_err(internal)?;
    started(server, &client)
}

/// The stored passkey as `webauthn_rp` checks it.
type Key = CompressedPubKey<[u8; 32], [u8; 32], [u8; 48], Vec<u8>>;

/// A stored passkey of the user with `handle`, as a ceremony checks it.
fn authenticated<'a>(
    stored: &'a Stored,
    handle: &'a UserHandle64,
) -> Result<AuthenticatedCredential<'a, 'a, 64, Key>, Refused> {
    let static_state = StaticState::<Key>::decode(&stored.static_state).map_err(internal)?;
    let dynamic: [u8; 7] =
        stored.dynamic_state.as_slice().try_into().map_err(|_| internal("a dynamic state is not 7 bytes"))?;
    let dynamic_state = DynamicState::decode(dynamic).map_err(internal)?;
    let id = CredentialId::<&[u8]>::decode(stored.credential_id.as_slice()).map_err(internal)?;
    AuthenticatedCredential::new(id, handle, static_state, dynamic_state).map_err(internal)
}

/// An authentication response (`AuthenticationResponseJSON`, what
/// `PublicKeyCredential.toJSON()` gives after `navigator.credentials.get`)
/// for signing in with a passkey alone: it names its user.
pub struct SignIn(DiscoverableAuthentication64);

impl SignIn {
    pub fn parse(json: &[u8]) -> Result<Self, Refused> {
        DiscoverableAuthentication64::from_json_relaxed(json).map(Self).map_err(malformed)
    }

    pub fn challenge(&self) -> Result<[u8; 16], Refused> {
        self.0.challenge_relaxed().map(challenge_bytes).map_err(malformed)
    }

    /// The credential it was made with.
    pub fn credential_id(&self) -> Vec<u8> {
        self.0.raw_id().as_ref().to_vec()
    }

    /// Verifies it against the ceremony's stored half and the passkey
    /// stored for its credential id, whose user has `handle`: the passkey's
    /// new dynamic state.
    pub fn verify(&self, site: &Site, state: &[u8], stored: &Stored, handle: &[u8]) -> Result<[u8; 7], Refused> {
        let server = DiscoverableAuthenticationServerState::decode(state).map_err(internal)?;
        let handle = user_handle(handle)?;
        let mut credential = authenticated(stored, &handle)?;
        server.verify(&site.rp_id, &self.0, &mut credential, &site.authentication_options()).map_err(failed)?;
        credential.dynamic_state().encode().map_err(internal)
    }
}

/// An authentication response for a passkey as the second factor.
pub struct SecondFactor(NonDiscoverableAuthentication64);

impl SecondFactor {
    pub fn parse(json: &[u8]) -> Result<Self, Refused> {
        NonDiscoverableAuthentication64::from_json_relaxed(json).map(Self).map_err(malformed)
    }

    pub fn challenge(&self) -> Result<[u8; 16], Refused> {
        self.0.challenge_relaxed().map(challenge_bytes).map_err(malformed)
    }

    pub fn credential_id(&self) -> Vec<u8> {
        self.0.raw_id().as_ref().to_vec()
    }

    /// As [`SignIn::verify`]; the ceremony listed the user's passkeys.
    pub fn verify(&self, site: &Site, state: &[u8], stored: &Stored, handle: &[u8]) -> Result<[u8; 7], Refused> {
        let server = NonDiscoverableAuthenticationServerState::decode(state).map_err(internal)?;
        let handle = user_handle(handle)?;
        let mut credential = authenticated(stored, &handle)?;
        server.verify(&site.rp_id, &self.0, &mut credential, &site.authentication_options()).map_err(failed)?;
        credential.dynamic_state().encode().map_err(internal)
    }
}

#[cfg(test)]
mod tests {
    //! The ceremonies against a software authenticator: a P-256 key that
    //! answers as a platform authenticator does (CTAP2 canonical CBOR,
    //! `none` attestation, DER signatures).

    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::{Signature, SigningKey};
    use serde_json::{Value, json};
    use sha2::{Digest as _, Sha256};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const ORIGIN: &str = "https://acme.example.com";

    struct Authenticator {
        key: SigningKey,
        credential_id: Vec<u8>,
        counter: u32,
        /// The flags of its assertions: user present and verified, unless a
        /// test says otherwise.
        assertion_flags: u8,
    }

    fn head(major: u8, len: usize, out: &mut Vec<u8>) {
        match u8::try_from(len) {
            Ok(small) if small < 24 => out.push(major << 5 | small),
            Ok(byte) => out.extend([major << 5 | 24, byte]),
            Err(_) => {
                out.push(major << 5 | 25);
                out.extend(u16::try_from(len).expect("short").to_be_bytes());
            }
        }
    }
    fn text(value: &str, out: &mut Vec<u8>) {
        head(3, value.len(), out);
        out.extend(value.as_bytes());
    }
    fn bytes(value: &[u8], out: &mut Vec<u8>) {
        head(2, value.len(), out);
        out.extend(value);
    }

    /// `SEQUENCE { INTEGER r, INTEGER s }`.
    fn der(signature: &Signature) -> Vec<u8> {
        let raw = signature.to_bytes();
        let int = |half: &[u8]| {
            let trimmed: Vec<u8> = half.iter().copied().skip_while(|b| *b == 0).collect();
            let mut out = vec![0x02];
            let pad = trimmed.first().is_none_or(|b| b & 0x80 != 0);
            out.push(u8::try_from(trimmed.len() + usize::from(pad)).expect("short"));
            if pad {
                out.push(0);
            }
            out.extend(trimmed);
            out
        };
        let body = [int(&raw[..32]), int(&raw[32..])].concat();
        [vec![0x30, u8::try_from(body.len()).expect("short")], body].concat()
    }

    impl Authenticator {
        fn new(seed: u8) -> Self {
            let key = SigningKey::from_bytes(&[seed; 32].into()).expect("a valid scalar");
            Self { key, credential_id: vec![seed; 32], counter: 0, assertion_flags: 0x05 }
        }

        /// The public key as COSE (EC2, ES256, P-256).
        fn cose_key(&self) -> Vec<u8> {
            let point = self.key.verifying_key().to_encoded_point(false);
            let mut out = vec![0xa5, 0x01, 0x02, 0x03, 0x26, 0x20, 0x01, 0x21];
            bytes(point.x().expect("x"), &mut out);
            out.push(0x22);
            bytes(point.y().expect("y"), &mut out);
            out
        }

        fn auth_data(&self, rp_id: &str, flags: u8, attested: bool) -> Vec<u8> {
            let mut data = Sha256::digest(rp_id.as_bytes()).to_vec();
            data.push(flags);
            data.extend(self.counter.to_be_bytes());
            if attested {
                data.extend([0u8; 16]); // AAGUID
                data.extend(u16::try_from(self.credential_id.len()).expect("short").to_be_bytes());
                data.extend(&self.credential_id);
                data.extend(self.cose_key());
            }
            data
        }

        fn client_data(kind: &str, options: &Value, origin: &str) -> Vec<u8> {
            json!({ "type": kind, "challenge": options["challenge"], "origin": origin, "crossOrigin": false })
                .to_string()
                .into_bytes()
        }

        /// `navigator.credentials.create` then `toJSON()`.
        fn create(&self, options: &Value, origin: &str) -> Vec<u8> {
            let rp_id = options["rp"]["id"].as_str().expect("rp.id");
            let client_data = Self::client_data("webauthn.create", options, origin);
            // Canonical order: shorter keys first.
            let mut object = vec![0xa3];
            text("fmt", &mut object);
            text("none", &mut object);
            text("attStmt", &mut object);
            object.push(0xa0);
            text("authData", &mut object);
            bytes(&self.auth_data(rp_id, 0x45, true), &mut object); // UP, UV, AT
            let id = B64.encode(&self.credential_id);
            json!({
                "id": id, "rawId": id, "type": "public-key",
                "response": {
                    "clientDataJSON": B64.encode(&client_data),
                    "attestationObject": B64.encode(&object),
                    "transports": ["internal"],
                },
                "clientExtensionResults": {},
                "authenticatorAttachment": "platform",
            })
            .to_string()
            .into_bytes()
        }

        /// `navigator.credentials.get` then `toJSON()`: signs with `signer`
        /// (the authenticator's own key unless a test swaps it).
        fn get_signed_by(
            &self,
            signer: &SigningKey,
            options: &Value,
            origin: &str,
            user_handle: Option<&str>,
        ) -> Vec<u8> {
            let rp_id = options["rpId"].as_str().expect("rpId");
            let client_data = Self::client_data("webauthn.get", options, origin);
            let auth_data = self.auth_data(rp_id, self.assertion_flags, false);
            let signed = [auth_data.clone(), Sha256::digest(&client_data).to_vec()].concat();
            let signature: Signature = signer.sign(&signed);
            let id = B64.encode(&self.credential_id);
            json!({
                "id": id, "rawId": id, "type": "public-key",
                "response": {
                    "clientDataJSON": B64.encode(&client_data),
                    "authenticatorData": B64.encode(&auth_data),
                    "signature": B64.encode(der(&signature)),
                    "userHandle": user_handle,
                },
                "clientExtensionResults": {},
                "authenticatorAttachment": "platform",
            })
            .to_string()
            .into_bytes()
        }

        fn get(&self, options: &Value, origin: &str, user_handle: Option<&str>) -> Vec<u8> {
            self.get_signed_by(&self.key, options, origin, user_handle)
        }
    }

    /// A registered passkey: its stored form and the user's handle (base64url
    /// as the options carried it, and raw).
    fn register(
        site: &Site,
        authenticator: &Authenticator,
    ) -> Result<(Stored, String, Vec<u8>), Box<dyn std::error::Error>> {
        let handle = new_user_handle();
        let started = start_registration(site, &handle, "ada@example.com", &[])?;
        let answer = NewCredential::parse(&authenticator.create(&started.options, ORIGIN))?;
        assert_eq!(answer.challenge()?, started.challenge);
        let new = answer.verify(site, &started.state)?;
        assert_eq!(new.credential_id, authenticator.credential_id);
        let encoded = started.options["user"]["id"].as_str().ok_or("user.id")?.to_owned();
        let stored = Stored {
            credential_id: new.credential_id,
            static_state: new.static_state,
            dynamic_state: new.dynamic_state.to_vec(),
            transports: new.transports,
        };
        Ok((stored, encoded, handle.to_vec()))
    }

    #[test]
    fn registration_options_ask_for_a_discoverable_verified_passkey() -> TestResult {
        let site = Site::new("example.com")?;
        let started = start_registration(&site, &new_user_handle(), "ada@example.com", &[(vec![7; 16], 0)])?;
        let options = &started.options;
        assert_eq!(options["rp"]["id"], "example.com");
        assert_eq!(options["user"]["name"], "ada@example.com");
        assert_eq!(options["authenticatorSelection"]["residentKey"], "required");
        assert_eq!(options["authenticatorSelection"]["userVerification"], "required");
        assert_eq!(options["excludeCredentials"][0]["id"], B64.encode([7; 16]));
        assert_eq!(B64.decode(options["challenge"].as_str().ok_or("challenge")?)?, started.challenge.to_vec());
        assert!(started.expires_at > SystemTime::now());
        Ok(())
    }

    #[test]
    fn a_registered_passkey_signs_in_alone_and_as_a_second_factor() -> TestResult {
        let site = Site::new("example.com")?;
        let mut authenticator = Authenticator::new(1);
        let (stored, encoded_handle, handle) = register(&site, &authenticator)?;

        authenticator.counter = 1;
        let started = start_sign_in(&site)?;
        assert_eq!(started.options["userVerification"], "required");
        let answer = SignIn::parse(&authenticator.get(&started.options, ORIGIN, Some(&encoded_handle)))?;
        assert_eq!(answer.challenge()?, started.challenge);
        assert_eq!(answer.credential_id(), authenticator.credential_id);
        let dynamic = answer.verify(&site, &started.state, &stored, &handle)?;
        assert_ne!(dynamic.to_vec(), stored.dynamic_state, "the counter is kept");
        let stored = Stored { dynamic_state: dynamic.to_vec(), ..stored };

        authenticator.counter = 2;
        let started = start_second_factor(&site, &[(stored.credential_id.clone(), stored.transports)])?;
        assert_eq!(started.options["allowCredentials"][0]["id"], B64.encode(&authenticator.credential_id));
        let answer = SecondFactor::parse(&authenticator.get(&started.options, "https://example.com", None))?;
        answer.verify(&site, &started.state, &stored, &handle)?;
        Ok(())
    }

    fn refused(result: Result<[u8; 7], Refused>) -> bool {
        matches!(result, Err(Refused::Failed(_)))
    }

    #[test]
    fn answers_from_elsewhere_or_by_another_key_are_refused() -> TestResult {
        let site = Site::new("example.com")?;
        let mut authenticator = Authenticator::new(2);
        let (stored, encoded, handle) = register(&site, &authenticator)?;
        authenticator.counter = 5;
        let sign = |origin: &str, signer: &SigningKey| -> Result<[u8; 7], Box<dyn std::error::Error>> {
            let started = start_sign_in(&site)?;
            let answer = SignIn::parse(&authenticator.get_signed_by(signer, &started.options, origin, Some(&encoded)))?;
            Ok(answer.verify(&site, &started.state, &stored, &handle)?)
        };
        // A page of the site, on a subdomain and another port: accepted.
        assert!(sign("https://acme.example.com:8443", &authenticator.key).is_ok());
        for origin in
            ["https://evil.test", "https://notexample.com", "http://example.com", "https://example.com.evil.test"]
        {
            let started = start_sign_in(&site)?;
            let answer = SignIn::parse(&authenticator.get(&started.options, origin, Some(&encoded)))?;
            assert!(refused(answer.verify(&site, &started.state, &stored, &handle)), "{origin}");
        }
        let other = Authenticator::new(3);
        let started = start_sign_in(&site)?;
        let forged = SignIn::parse(&authenticator.get_signed_by(&other.key, &started.options, ORIGIN, Some(&encoded)))?;
        assert!(refused(forged.verify(&site, &started.state, &stored, &handle)), "another key's signature");

        // An answer to one ceremony does not finish another.
        let first = start_sign_in(&site)?;
        let second = start_sign_in(&site)?;
        let answer = SignIn::parse(&authenticator.get(&first.options, ORIGIN, Some(&encoded)))?;
        assert!(refused(answer.verify(&site, &second.state, &stored, &handle)), "another challenge");

        // Another account's user handle.
        let started = start_sign_in(&site)?;
        let answer = SignIn::parse(&authenticator.get(&started.options, ORIGIN, Some(&encoded)))?;
        assert!(refused(answer.verify(&site, &started.state, &stored, &new_user_handle())), "another user");
        Ok(())
    }

    #[test]
    fn a_counter_that_goes_back_is_a_clone_and_refused() -> TestResult {
        let site = Site::new("example.com")?;
        let mut authenticator = Authenticator::new(4);
        let (stored, encoded, handle) = register(&site, &authenticator)?;
        authenticator.counter = 10;
        let started = start_sign_in(&site)?;
        let answer = SignIn::parse(&authenticator.get(&started.options, ORIGIN, Some(&encoded)))?;
        let stored =
            Stored { dynamic_state: answer.verify(&site, &started.state, &stored, &handle)?.to_vec(), ..stored };
        authenticator.counter = 9;
        let started = start_sign_in(&site)?;
        let answer = SignIn::parse(&authenticator.get(&started.options, ORIGIN, Some(&encoded)))?;
        assert!(refused(answer.verify(&site, &started.state, &stored, &handle)));
        Ok(())
    }

    #[test]
    fn alone_a_passkey_must_verify_its_user_as_a_second_factor_presence_is_enough() -> TestResult {
        let site = Site::new("example.com")?;
        let mut authenticator = Authenticator::new(7);
        let (stored, encoded, handle) = register(&site, &authenticator)?;
        authenticator.assertion_flags = 0x01; // present, not verified
        let started = start_sign_in(&site)?;
        let answer = SignIn::parse(&authenticator.get(&started.options, ORIGIN, Some(&encoded)))?;
        assert!(refused(answer.verify(&site, &started.state, &stored, &handle)), "alone, without user verification");
        let started = start_second_factor(&site, &[(stored.credential_id.clone(), stored.transports)])?;
        let answer = SecondFactor::parse(&authenticator.get(&started.options, ORIGIN, None))?;
        answer.verify(&site, &started.state, &stored, &handle)?;
        Ok(())
    }

    #[test]
    fn plain_http_is_for_localhost_only() -> TestResult {
        let local = Site::new("localhost")?;
        let authenticator = Authenticator::new(5);
        let started = start_registration(&local, &new_user_handle(), "ada@example.com", &[])?;
        let answer = NewCredential::parse(&authenticator.create(&started.options, "http://localhost:8080"))?;
        answer.verify(&local, &started.state)?;

        let site = Site::new("example.com")?;
        let started = start_registration(&site, &new_user_handle(), "ada@example.com", &[])?;
        let answer = NewCredential::parse(&authenticator.create(&started.options, "http://example.com"))?;
        assert!(matches!(answer.verify(&site, &started.state), Err(Refused::Failed(_))));
        Ok(())
    }

    #[test]
    fn what_is_not_a_webauthn_answer_is_malformed() -> TestResult {
        assert!(matches!(NewCredential::parse(b"{}"), Err(Refused::Malformed(_))));
        assert!(matches!(SignIn::parse(b"[1, 2]"), Err(Refused::Malformed(_))));
        let site = Site::new("example.com")?;
        let authenticator = Authenticator::new(6);
        let started = start_registration(&site, &new_user_handle(), "ada@example.com", &[])?;
        // A registration answer is not a sign-in answer.
        assert!(SignIn::parse(&authenticator.create(&started.options, ORIGIN)).is_err());
        assert!(Site::new("not a domain").is_err());
        Ok(())
    }
}
