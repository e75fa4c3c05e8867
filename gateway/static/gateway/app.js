// Small behaviours shared by every page; no framework, nothing from a CDN.
document.addEventListener("submit", (event) => {
  // <form data-confirm="Really?"> asks before it is sent.
  const question = event.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) event.preventDefault();
});
