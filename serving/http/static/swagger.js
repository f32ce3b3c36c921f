// Starts Swagger UI on xlserve's OpenAPI document. A file of its own rather than an inline script,
// so the page runs under a Content-Security-Policy without 'unsafe-inline'.
"use strict";

const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  domNode: root,
  deepLinking: true,
  // No badge from the public validator: the page must work without the internet.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
