//! Resolution against in-memory environments and files.

use std::collections::HashMap;

use super::*;

/// An environment and a file system in maps.
#[derive(Default)]
struct Fake {
    env: HashMap<&'static str, String>,
    files: HashMap<PathBuf, FileText>,
}

impl Fake {
    fn env(mut self, name: &'static str, value: &str) -> Self {
        self.env.insert(name, value.into());
        self
    }

    fn file(mut self, path: &str, mode: u32, text: &str) -> Self {
        self.files.insert(path.into(), FileText { text: text.into(), is_file: true, mode });
        self
    }

    fn resolve(&self, conninfo: &str) -> Result<Resolved, ReplicationError> {
        let env = |name: &str| self.env.get(name).cloned();
        let file = |path: &Path| self.files.get(path).cloned();
        resolve(conninfo, &System { env: &env, file: &file, os_user: Some("osuser".into()) })
    }
}

fn home() -> Fake {
    Fake::default().env("HOME", "/home/u")
}

#[test]
fn the_string_beats_the_service_beats_the_environment_beats_defaults() {
    let fake = home()
        .env("PGSERVICE", "shop")
        .env("PGHOST", "env-host")
        .env("PGPORT", "7000")
        .env("PGDATABASE", "envdb")
        .env("PGAPPNAME", "env-app")
        .env("PGCONNECT_TIMEOUT", "3")
        .env("PGSSLMODE", "disable")
        .file("/home/u/.pg_service.conf", 0o644, "[shop]\nhost=svc-host\nport=6000\n");
    let r = fake.resolve("host=string-host").unwrap();
    assert_eq!(r.get("host"), Some("string-host"));
    assert_eq!(r.get("port"), Some("6000"));
    assert_eq!(r.get("dbname"), Some("envdb"));
    assert_eq!(r.get("application_name"), Some("env-app"));
    assert_eq!(r.get("user"), Some("osuser"));
    assert_eq!(r.password_source, PasswordSource::None);
    let config = r.source_config().unwrap();
    assert_eq!(config.user(), "osuser");
    assert_eq!(config.connect_timeout(), std::time::Duration::from_secs(3));
    assert_eq!(config.tls(), &TlsMode::Disable);
    assert_eq!(config.addresses(), vec![super::super::config::SourceAddress::Tcp("string-host".into(), 6000)]);
    assert_eq!(config.postgres_config().get_application_name(), Some("env-app"));

    // Without a service, the environment fills in.
    let mut fake = fake;
    fake.env.remove("PGSERVICE");
    let r = fake.resolve("user=ada").unwrap();
    assert_eq!((r.get("host"), r.get("port"), r.get("user")), (Some("env-host"), Some("7000"), Some("ada")));
    // An empty `service=` names the service "", as in libpq.
    assert!(fake.resolve("service='' user=ada").is_err());
}

#[test]
fn services_from_the_user_file_then_the_system_file() {
    let fake = home()
        .env("PGSYSCONFDIR", "/etc/pg")
        .file("/home/u/.pg_service.conf", 0o644, "[mine]\nhost=user-file\n")
        .file("/etc/pg/pg_service.conf", 0o644, "[mine]\nhost=system\n[sys]\nhost=system\nsslmode=require\n");
    assert_eq!(fake.resolve("service=mine").unwrap().get("host"), Some("user-file"));
    let r = fake.resolve("postgres:///db?service=sys").unwrap();
    assert_eq!(r.get("host"), Some("system"));
    assert_eq!(r.source_config().unwrap().tls(), &TlsMode::Require);
    let e = fake.resolve("service=nope").unwrap_err();
    assert_eq!(e.message(), "definition of service \"nope\" not found");

    let fake = home().env("PGSERVICEFILE", "/srv/services").file("/srv/services", 0o600, "[s]\nport=1234\n");
    assert_eq!(fake.env("PGSERVICE", "s").resolve("").unwrap().get("port"), Some("1234"));
}

#[test]
fn password_precedence_string_service_environment_file() {
    let pgpass = "*:*:*:*:from-file\n";
    let service = "[s]\npassword=from-service\n";
    let all = home().env("PGPASSWORD", "from-env").file("/home/u/.pgpass", 0o600, pgpass).file(
        "/home/u/.pg_service.conf",
        0o600,
        service,
    );
    let check = |fake: &Fake, conninfo: &str, want: &str, source: PasswordSource| {
        let r = fake.resolve(conninfo).unwrap();
        assert_eq!(r.source_config().unwrap().password(), Some(want.as_bytes()), "{conninfo}");
        assert_eq!(r.password_source, source, "{conninfo}");
    };
    check(&all, "service=s password=from-string", "from-string", PasswordSource::ConnectionString);
    check(&all, "service=s", "from-service", PasswordSource::Service);
    check(&all, "host=h", "from-env", PasswordSource::Environment);
    let file = home().file("/home/u/.pgpass", 0o600, pgpass);
    check(&file, "host=h", "from-file", PasswordSource::PasswordFile("/home/u/.pgpass".into()));
    // An empty password means "look it up", as in libpq.
    check(&file, "postgres://u:@h/db", "from-file", PasswordSource::PasswordFile("/home/u/.pgpass".into()));
    // PGPASSFILE and passfile= move the file.
    let moved = Fake::default().env("PGPASSFILE", "/run/pw").file("/run/pw", 0o400, pgpass);
    check(&moved, "host=h", "from-file", PasswordSource::PasswordFile("/run/pw".into()));
    let moved = Fake::default().file("/run/pw2", 0o400, pgpass);
    check(&moved, "host=h passfile=/run/pw2", "from-file", PasswordSource::PasswordFile("/run/pw2".into()));
    assert_eq!(Fake::default().resolve("host=h").unwrap().password_source, PasswordSource::None);
}

#[test]
fn the_password_file_matches_host_port_database_and_user() {
    let fake = home().file(
        "/home/u/.pgpass",
        0o600,
        "db.example:5432:shop:ada:one\n\
         db.example:6543:*:ada:two\n\
         localhost:5432:ada:ada:three\n\
         /sockets:5432:*:*:four\n",
    );
    let password = |conninfo: &str| fake.resolve(conninfo).unwrap().get("password").map(str::to_owned);
    assert_eq!(password("postgres://ada@db.example/shop").as_deref(), Some("one"));
    assert_eq!(password("postgres://ada@db.example:6543/other").as_deref(), Some("two"));
    assert_eq!(password("postgres://ada@db.example/other"), None);
    // No host, or the default socket directory, is `localhost`; no database is the user's.
    assert_eq!(password("user=ada").as_deref(), Some("three"));
    assert_eq!(password("user=ada host=/var/run/postgresql").as_deref(), Some("three"));
    assert_eq!(password("user=ada host=/sockets").as_deref(), Some("four"));
    // The first of several hosts.
    assert_eq!(password("postgres://ada@db.example,other/shop").as_deref(), Some("one"));
    // The environment's user and port take part.
    let fake = fake.env("PGUSER", "ada").env("PGPORT", "6543").env("PGHOST", "db.example");
    assert_eq!(fake.resolve("dbname=x").unwrap().get("password"), Some("two"));
}

#[test]
fn an_open_password_file_is_ignored_with_a_warning() {
    let fake = home().file("/home/u/.pgpass", 0o644, "*:*:*:*:secret\n");
    let r = fake.resolve("host=h").unwrap();
    assert_eq!(r.get("password"), None);
    assert_eq!(
        r.warnings,
        ["password file \"/home/u/.pgpass\" has group or world access; permissions should be u=rw (0600) or less"]
    );
    let mut fake = home();
    fake.files.insert("/home/u/.pgpass".into(), FileText { text: String::new(), is_file: false, mode: 0o600 });
    assert!(fake.resolve("host=h").unwrap().warnings[0].contains("not a plain file"));
}

#[test]
fn tls_settings_from_every_source() {
    // verify-full reads its root certificate at once: the error shows which file was taken.
    let unreadable = |e: ReplicationError| assert!(e.message().contains("cannot read sslrootcert /ca.pem"), "{e:?}");
    let r = Fake::default().env("PGSSLMODE", "verify-full").env("PGSSLROOTCERT", "/ca.pem").resolve("host=h");
    unreadable(r.unwrap().source_config().unwrap_err());
    unreadable("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fca.pem".parse::<SourceConfig>().unwrap_err());
    let c: SourceConfig = "postgres://u@h/db?sslmode=require".parse().unwrap();
    assert_eq!(c.tls(), &TlsMode::Require);
    assert_eq!(c.postgres_config().get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    let c = Fake::default().env("PGSSLMODE", "require").resolve("host=h sslmode=disable").unwrap();
    assert_eq!(c.source_config().unwrap().tls(), &TlsMode::Disable);
    let e = "host=h sslmode=verify-full".parse::<SourceConfig>().unwrap_err();
    assert!(e.message().contains("sslrootcert"));
    assert!("host=h sslmode=verify-ca sslrootcert=/x".parse::<SourceConfig>().is_err());
}

#[test]
fn no_password_in_errors_or_debug_output() {
    let fake = home().env("PGPASSWORD", "hunter2secret").env("PGPORT", "notaport");
    let e = fake.resolve("host=h").unwrap().source_config().unwrap_err();
    assert!(!format!("{e} {e:?}").contains("hunter2secret"), "{e:?}");
    let r = home().resolve("password=hunter2secret host=h").unwrap();
    let config = r.source_config().unwrap();
    assert!(!format!("{r:?}").contains("hunter2secret"), "{r:?}");
    assert!(!format!("{config:?}").contains("hunter2secret"), "{config:?}");
    for bad in ["postgres://u:hunter2secret@h:x/db", "password=hunter2secret port=x", "password=hunter2secret bad=1"] {
        let e = home().resolve(bad).and_then(|r| r.source_config()).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("hunter2secret"), "{bad}: {e:?}");
    }
}
