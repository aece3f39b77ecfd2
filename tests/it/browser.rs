//! A real headless Chromium, driven through chromedriver (WebDriver), for
//! the checks of what a person sees on a report page.
//!
//! Without a browser the tests that need one skip, saying so on stderr;
//! with `JE_REQUIRE_BROWSER=1` (as `.ci/run` sets) or `CI` set, a missing
//! browser fails them instead. `JE_CHROMIUM` and `JE_CHROMEDRIVER` name
//! other binaries than Debian's `chromium` and `chromedriver`.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

/// The flags Chromium needs to run as root, headless, in a closed network.
const CHROMIUM_FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// How long chromedriver may take to listen.
const DRIVER_START_MAX: Duration = Duration::from_secs(20);

/// A running chromedriver and one Chromium session. Dropping it kills the
/// driver and the browser (their process group), even after a panic.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn binary(variable: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Whether a missing browser must fail rather than skip.
pub fn browser_required() -> bool {
    std::env::var("JE_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
        || std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile and
    /// a window of `width` × `height`; `None` (after saying so on stderr)
    /// when none is installed and none is required.
    pub async fn start(test: &str, width: u32, height: u32) -> Option<Browser> {
        Browser::start_with(test, width, height, &[]).await
    }

    /// [`Browser::start`] with more Chromium flags.
    pub async fn start_with(
        test: &str,
        width: u32,
        height: u32,
        flags: &[&str],
    ) -> Option<Browser> {
        let chromium = binary(
            "JE_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        );
        let driver = binary("JE_CHROMEDRIVER", &["chromedriver"]);
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            assert!(
                !browser_required(),
                "{test}: JE_REQUIRE_BROWSER=1 (or CI) but no chromium/chromedriver found: \
                 apt-get install chromium chromium-driver"
            );
            // Straight to the process's stderr: the test harness captures
            // eprintln! of passing tests, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: {test}: no chromium/chromedriver found \
                 (apt-get install chromium chromium-driver to run it)"
            );
            return None;
        };
        Some(Browser::launch(&chromium, &driver, width, height, flags).await)
    }

    async fn launch(
        chromium: &Path,
        driver: &Path,
        width: u32,
        height: u32,
        flags: &[&str],
    ) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that Drop can end the browser too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", driver.display()));
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.push(format!("--window-size={width},{height}"));
        args.push("--hide-scrollbars".to_owned());
        args.push("--force-color-profile=srgb".to_owned());
        args.extend(flags.iter().map(|f| f.to_string()));
        let capabilities = json!({
            "browserName": "chrome",
            // A dialog a page opens stays open, for the test to find.
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let client = loop {
            let mut builder =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            match builder
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                // Not listening yet.
                Err(_) if started.elapsed() < DRIVER_START_MAX => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("chromedriver did not start a session: {e}"),
            }
        };
        Browser {
            client,
            driver: child,
            _profile: profile,
        }
    }

    /// Opens a file, as a person double-clicking it would.
    pub async fn open(&self, path: &Path) {
        let url = format!("file://{}", path.canonicalize().unwrap().display());
        self.client.goto(&url).await.unwrap();
    }

    /// Runs `script` in the page (WebDriver scripts are not subject to the
    /// page's policy) and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// The text a person sees in the elements matching `selector`.
    pub async fn texts(&self, selector: &str) -> Vec<String> {
        let script = format!(
            "return [...document.querySelectorAll({})].map(e => (e.innerText ?? e.textContent).trim());",
            json!(selector)
        );
        serde_json::from_value(self.eval(&script).await).unwrap()
    }

    /// The text of the one element matching `selector`.
    pub async fn text(&self, selector: &str) -> String {
        let texts = self.texts(selector).await;
        assert_eq!(texts.len(), 1, "one {selector}: {texts:?}");
        texts.into_iter().next().unwrap()
    }

    /// Ends the session, then the driver.
    pub async fn quit(self) {
        // The session closes its browser; Drop ends the driver.
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: killpg on the group this Browser created; no memory involved.
        unsafe {
            libc::killpg(self.driver.id() as libc::pid_t, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}
