document.getElementById("latent-filter").addEventListener("input", event => {
  const query = event.target.value.trim().toLowerCase(), byNumber = /^[0-9]+$/.test(query);
  document.querySelectorAll("#latents tbody tr").forEach(row => {
    const name = row.dataset.latent;
    const shown = !query || (byNumber ? name === query || name.endsWith("/" + query)
                                      : row.lastElementChild.textContent.toLowerCase().includes(query));
    row.style.display = shown ? "" : "none";
  });
});
