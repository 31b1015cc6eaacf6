// The feature page's steering form: generating takes a while on a CPU, so the button says so.
document.querySelector("#steer form").addEventListener("submit", (event) => {
  const button = event.target.querySelector("button");
  button.disabled = true;
  button.textContent = "Generating…";
});
