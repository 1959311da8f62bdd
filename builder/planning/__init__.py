"""Planning what to build before building it: model cost at a shape (`plan`), the memory and cost
model with its GPU table (`costs`, `data/gpus.json`), the use-case x GPU matrix (`matrix`) and the
profile wizard (`wizard`)."""
