// JDBC compatibility check, run by clients.rs as a single-file Java program:
//   java -cp /usr/share/java/postgresql.jar KappaJdbc.java PORT
// Prints one line per check; the Rust test compares them with the expected lines.
import java.sql.*;

public class KappaJdbc {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/kappa?user=kappa";
        try (Connection c = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement()) {
                s.execute("CREATE TABLE orders (id BIGINT PRIMARY KEY, customer TEXT, amount DOUBLE, ts TIMESTAMP)");
                s.execute("CREATE MATERIALIZED VIEW spend AS SELECT customer, count(*) AS n, sum(amount) AS total, max(amount) AS biggest FROM orders WHERE amount > 0 GROUP BY customer");
            }
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO orders VALUES (?, ?, ?, ?)")) {
                Object[][] rows = {{1L, "ann", 10.0}, {2L, "bob", 5.0}, {3L, "ann", 7.0}};
                for (Object[] r : rows) {
                    ins.setLong(1, (Long) r[0]);
                    ins.setString(2, (String) r[1]);
                    ins.setDouble(3, (Double) r[2]);
                    ins.setTimestamp(4, Timestamp.valueOf("2024-05-06 07:08:09.5"));
                    System.out.println("inserted " + ins.executeUpdate());
                }
            }
            // More executions than prepareThreshold (5): the driver switches to a named
            // server-side statement and binary results.
            try (PreparedStatement q = c.prepareStatement("SELECT customer, n, total, biggest FROM spend WHERE customer = ? ORDER BY customer")) {
                for (int i = 0; i < 7; i++) {
                    q.setString(1, "ann");
                    try (ResultSet rs = q.executeQuery()) {
                        while (rs.next()) {
                            if (i == 0 || i == 6) {
                                System.out.println(rs.getString(1) + " " + rs.getLong(2) + " " + rs.getDouble(3) + " " + rs.getDouble(4));
                            }
                        }
                    }
                }
            }
            try (Statement s = c.createStatement()) {
                System.out.println("updated " + s.executeUpdate("UPDATE orders SET amount = 1 WHERE id = 1"));
                System.out.println("deleted " + s.executeUpdate("DELETE FROM orders WHERE id = 2"));
                try (ResultSet rs = s.executeQuery("SELECT customer, n, total, biggest FROM spend ORDER BY customer")) {
                    while (rs.next()) {
                        System.out.println(rs.getString(1) + " " + rs.getLong(2) + " " + rs.getDouble(3) + " " + rs.getDouble(4));
                    }
                }
                try (ResultSet rs = s.executeQuery("SELECT ts FROM orders WHERE id = 3")) {
                    rs.next();
                    System.out.println("ts " + rs.getTimestamp(1));
                }
                try {
                    s.executeUpdate("INSERT INTO orders VALUES (1, 'dup', 1, NULL)");
                    System.out.println("no error");
                } catch (SQLException e) {
                    System.out.println("error " + e.getSQLState());
                }
                try (ResultSet rs = s.executeQuery("SELECT count(*) FROM orders")) {
                    rs.next();
                    System.out.println("count " + rs.getLong(1));
                }
            }
        }
    }
}
