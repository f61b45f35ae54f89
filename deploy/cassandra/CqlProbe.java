// A CQL client for scripts/cassandra, run with Java's single-file source
// launcher on the classpath of the resolved Cassandra jars (cassandra-all
// depends on the DataStax Java driver 3.x, shaded), so readiness is checked
// by a real query and nothing else needs installing.
//
//   java -cp 'lib/*' CqlProbe.java HOST PORT [CQL]
//
// Connects to HOST:PORT only (no other node is contacted), runs CQL (default:
// the node's release version), prints each row's columns tab-separated, and
// exits 0; exits 1 with the error on stderr if the node does not answer.
import com.datastax.driver.core.Cluster;
import com.datastax.driver.core.ColumnDefinitions;
import com.datastax.driver.core.Row;
import com.datastax.driver.core.Session;
import com.datastax.driver.core.SocketOptions;
import com.datastax.driver.core.policies.WhiteListPolicy;
import com.datastax.driver.core.policies.RoundRobinPolicy;
import java.net.InetSocketAddress;
import java.util.List;

public class CqlProbe {
    public static void main(String[] args) {
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        String cql = args.length > 2 ? args[2] : "SELECT release_version FROM system.local";
        InetSocketAddress node = new InetSocketAddress(host, port);
        try (Cluster cluster = Cluster.builder()
                .addContactPointsWithPorts(node)
                .withLoadBalancingPolicy(new WhiteListPolicy(new RoundRobinPolicy(), List.of(node)))
                .withSocketOptions(new SocketOptions().setConnectTimeoutMillis(5000).setReadTimeoutMillis(20000))
                .withoutMetrics()
                .withoutJMXReporting()
                .build();
             Session session = cluster.connect()) {
            for (Row row : session.execute(cql)) {
                StringBuilder line = new StringBuilder();
                ColumnDefinitions cols = row.getColumnDefinitions();
                for (int i = 0; i < cols.size(); i++) {
                    if (i > 0) line.append('\t');
                    line.append(row.getObject(i));
                }
                System.out.println(line);
            }
        } catch (Exception e) {
            System.err.println("cql: " + e);
            System.exit(1);
        }
    }
}
