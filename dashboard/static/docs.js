// /docs: Swagger UI on the CA API's OpenAPI document (GET /v1/openapi.json). No network beyond this server:
// the validator badge, which would call an outside service, is off.
const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.specUrl,
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
});
