//! The browser client from `web/`, embedded in the binary so it runs from any
//! directory.

use super::ApiError;
use actix_web::{HttpRequest, HttpResponse};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "web/"]
struct WebAssets;

fn serve(path: &str) -> Result<HttpResponse, ApiError> {
    let file = WebAssets::get(path).ok_or(ApiError::NotFound)?;
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    Ok(HttpResponse::Ok()
        .content_type(mime.essence_str())
        .insert_header(("Cache-Control", "no-cache"))
        .body(file.data.into_owned()))
}

pub async fn index() -> Result<HttpResponse, ApiError> {
    serve("index.html")
}

/// Any other GET path names a file of the web client; everything else is 404.
pub async fn asset(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    if req.method() != actix_web::http::Method::GET {
        return Err(ApiError::NotFound);
    }
    serve(req.path().trim_start_matches('/'))
}
